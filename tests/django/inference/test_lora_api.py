"""LoRA adapters through the API, end to end: a real engine replica with --enable-lora, a real daphne
server, the official `openai` SDK. Two tenants register one adapter each (random PEFT adapters of the
bundled SmolLM2, made with `peft`) through the service staff use; the replica loads them from the
adapter hash without a restart. Each tenant sees and calls only its own adapter (the other's is the
404 of any unknown model), its greedy tokens are the offline engine's under that adapter and not the
base model's, on REST, SSE, websockets and batch lines alike, and usage rows name the adapter.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import uuid

import openai
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from tenants.lora_services import register_lora_adapter, remove_lora_adapter
from tenants.models import AuditLog, LoRAAdapter, UsageEvent
from tenants.services import create_api_key
from tests.django.inference.conftest import MODEL, LiveStack
from tests.django.inference.test_batches import Worker, results, submit, wait_for
from tests.django.inference.test_streaming_transports import frames_until, ws_connect
from tests.django.live_server import daphne_server
from tests.django.lora_testing import write_adapter
from tests.service.conftest import REPO_ROOT, Replica, redis_answers, wait_until

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "max_tokens": 8}


def run_helper(*args: str, timeout: float = 600) -> str:
    """tests/django/inference/smollm2_lora.py in its own process (torch stays out of this one)."""
    done = subprocess.run([sys.executable, "-m", "tests.django.inference.smollm2_lora", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def adapter_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    folders = {name: root / name for name in ("a", "b")}
    for seed, folder in enumerate(folders.values(), start=1):
        run_helper("make", str(folder), "--seed", str(seed))
    return folders


@pytest.fixture(scope="module")
def lora_live(django_test_database, tmp_path_factory):
    """A replica serving the bundled model with LoRA on and a daphne server, under this session's key
    prefix (so the adapter registrations made here reach the server's adapter cache at once)."""
    redis_url = settings.REDIS_URL
    if not redis_answers(redis_url):
        pytest.skip(f"no Redis at {redis_url}")
    logs, prefix = tmp_path_factory.mktemp("lora-live"), settings.ENGINE_KEY_PREFIX
    replica = Replica(redis_url, prefix, "lora-replica",
                      ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "16"], logs / "engine.log")
    stack = LiveStack("", redis_url, prefix, replica, logs / "daphne.log")
    try:
        replica.wait_ready()
        with daphne_server(log_path=stack.server_log, ready_path="/ready",
                           env={"REDIS_URL": redis_url, "ENGINE_KEY_PREFIX": prefix}) as base_url:
            stack.base_url = base_url
            yield stack
    finally:
        replica.kill()
        print("--- engine log ---\n" + replica.log_tail())
        _leave_as_found(redis_url, prefix)


def _leave_as_found(redis_url: str, prefix: str) -> None:
    """This module shares the session's key prefix and database with later tests (/ready's, the
    adapter services'): drop the model card, heartbeats and adapter hash it left under the prefix,
    and the adapters it registered (committed: the live server reads them)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{prefix}:*"):
        client.delete(key)
    client.close()
    LoRAAdapter.objects.all().delete()
    AuditLog.objects.filter(action__startswith="lora_adapter.").delete()


def registered(live: LiveStack, folder, *, name: str) -> str:
    """A new tenant with `name` registered for it, loaded by the replica; returns the tenant's key."""
    key = live.new_key()
    register_lora_adapter(tenant=live.tenant_of(key), name=name, base_model=MODEL, path=str(folder), actor="test")
    wait_until(lambda: name in live.replica.heartbeat().lora_adapters, 60, f"the replica to load {name}", 0.2)
    return key


def test_two_tenants_each_see_and_call_only_their_own_adapter(lora_live, adapter_folders):
    suffix = uuid.uuid4().hex[:6]
    name_a, name_b = f"acme-support-{suffix}", f"globex-legal-{suffix}"
    key_a = registered(lora_live, adapter_folders["a"], name=name_a)
    key_b = registered(lora_live, adapter_folders["b"], name=name_b)
    client_a, client_b = lora_live.openai(key_a), lora_live.openai(key_b)

    listed = {m.id: m for m in client_a.models.list().data}
    assert set(listed) == {MODEL, name_a}
    assert (listed[name_a].parent, listed[name_a].root) == (MODEL, str(adapter_folders["a"]))
    assert listed[MODEL].parent is None and listed[MODEL].root == MODEL
    assert {m.id for m in client_b.models.list().data} == {MODEL, name_b}
    assert client_a.models.retrieve(name_a).parent == MODEL

    for missing in (name_b, f"no-such-model-{suffix}"):  # another tenant's adapter is any unknown model
        with pytest.raises(openai.NotFoundError) as info:
            client_a.completions.create(model=missing, prompt=PROMPT, **GREEDY)
        assert info.value.body == {"message": f"The model `{missing}` does not exist or you do not have access to it.",
                                   "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
        with pytest.raises(openai.NotFoundError):
            client_a.models.retrieve(missing)

    with lora_live.http() as http:  # vLLM's /tokenize: an adapter tokenizes as its base model does
        def tokenize(model):
            return http.post("/tokenize", json={"model": model, "prompt": PROMPT},
                             headers={"Authorization": f"Bearer {key_a}"})
        assert tokenize(name_a).json()["tokens"] == tokenize(MODEL).json()["tokens"]
        assert tokenize(name_b).json()["error"]["code"] == "model_not_found"

    base = client_a.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).choices[0].text
    texts = {}
    for name, client in ((name_a, client_a), (name_b, client_b)):
        completion = client.completions.create(model=name, prompt=PROMPT, **GREEDY)
        assert completion.model == name and completion.usage.completion_tokens == GREEDY["max_tokens"]
        texts[name] = completion.choices[0].text
        assert client.completions.create(model=name, prompt=PROMPT, **GREEDY).choices[0].text == texts[name]
    assert len({base, *texts.values()}) == 3, (base, texts)
    offline = json.loads(run_helper("generate", "--adapter", str(adapter_folders["a"]), "--prompt", PROMPT,
                                    "--max-tokens", str(GREEDY["max_tokens"])).splitlines()[-1])
    assert texts[name_a] == offline["text"]

    streamed = "".join(chunk.choices[0].text for chunk in client_a.completions.create(
        model=name_a, prompt=PROMPT, stream=True, **GREEDY))
    assert streamed == texts[name_a]
    chat = client_b.chat.completions.create(model=name_b, messages=[{"role": "user", "content": "Hi"}], **GREEDY)
    assert chat.model == name_b and chat.choices[0].message.content
    with ws_connect(lora_live, key_a) as socket:
        assert json.loads(socket.recv(timeout=30)) == {"type": "authenticated"}
        socket.send(json.dumps({"type": "request", "id": "own", "endpoint": "completions",
                                "body": {"model": name_a, "prompt": PROMPT, **GREEDY}}))
        socket.send(json.dumps({"type": "request", "id": "other", "endpoint": "completions",
                                "body": {"model": name_b, "prompt": PROMPT, **GREEDY}}))
        frames = frames_until(socket, {"own", "other"})
    assert "".join(f["data"]["choices"][0]["text"] for f in frames if f["type"] == "chunk") == texts[name_a]
    assert [f["error"]["code"] for f in frames if f["type"] == "error"] == ["model_not_found"]

    def usage_rows():
        return sorted(UsageEvent.objects.filter(tenant=lora_live.tenant_of(key_a)).values_list("model", flat=True))

    expected = sorted([MODEL] + [name_a] * 4)  # base, two completions, the stream, the websocket call
    wait_until(lambda: usage_rows() == expected, 30, f"usage rows {expected}", 0.2)
    assert set(UsageEvent.objects.filter(tenant=lora_live.tenant_of(key_b)).values_list("model", flat=True)) == {name_b}


def test_a_key_allowlist_applies_to_adapters_and_removal_ends_calls(lora_live, adapter_folders):
    name = f"acme-narrow-{uuid.uuid4().hex[:6]}"
    key = registered(lora_live, adapter_folders["a"], name=name)
    tenant = lora_live.tenant_of(key)
    _, base_only = create_api_key(tenant=tenant, allowed_models=[MODEL])
    with pytest.raises(openai.PermissionDeniedError):
        lora_live.openai(base_only).completions.create(model=name, prompt=PROMPT, **GREEDY)
    assert {m.id for m in lora_live.openai(base_only).models.list().data} == {MODEL}

    remove_lora_adapter(adapter=tenant.lora_adapters.get(name=name), actor="test")
    with pytest.raises(openai.NotFoundError):
        lora_live.openai(key).completions.create(model=name, prompt=PROMPT, **GREEDY)
    wait_until(lambda: name not in lora_live.replica.heartbeat().lora_adapters, 60, f"the replica to drop {name}", 0.2)


def test_batch_lines_call_the_tenants_own_adapter(lora_live, adapter_folders, tmp_path):
    suffix = uuid.uuid4().hex[:6]
    own, other = f"acme-batch-{suffix}", f"globex-batch-{suffix}"
    key = registered(lora_live, adapter_folders["a"], name=own)
    registered(lora_live, adapter_folders["b"], name=other)
    client = lora_live.openai(key)
    interactive = client.completions.create(model=own, prompt=PROMPT, **GREEDY).choices[0].text
    worker = Worker(lora_live, tmp_path).start()
    try:
        lines = [{"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                  "body": {"model": model, "prompt": PROMPT, **GREEDY}}
                 for custom_id, model in (("own", own), ("other", other), ("base", MODEL))]
        batch = submit(client, lines, endpoint="/v1/completions")
        done = wait_for(client, batch.id, lambda b: b.status in ("completed", "failed"), worker=worker)
    finally:
        worker.kill()
        print("--- celery log ---\n" + worker.log_tail())
    output = {line["custom_id"]: line["response"] for line in results(client, done.output_file_id)}
    errors = {line["custom_id"]: line["response"] for line in results(client, done.error_file_id)}
    assert set(output) == {"own", "base"} and set(errors) == {"other"}
    assert output["own"]["body"]["model"] == own and output["own"]["body"]["choices"][0]["text"] == interactive
    assert output["base"]["body"]["choices"][0]["text"] != interactive
    assert errors["other"]["status_code"] == 404 and errors["other"]["body"]["error"]["code"] == "model_not_found"


def test_an_adapter_made_for_another_model_fails_to_load_with_the_replicas_reason(lora_live, tmp_path):
    """Only loading knows the base model's shapes: the command reports the replica's reason, and a
    call of the adapter is a 503 `lora_not_found` that leaves the base model's calls alone."""
    name = f"acme-wrong-{uuid.uuid4().hex[:6]}"
    key = lora_live.new_key()
    folder = write_adapter(tmp_path / "wrong", rank=4, hidden=32)  # SmolLM2's hidden size is 576
    reason = re.escape("has shape [4, 32], but this model needs [4, 576]")
    with pytest.raises(CommandError, match=f"loaded on 0 of 1 replicas; not loaded on lora-replica: .*{reason}"):
        call_command("register_lora_adapter", "--tenant", lora_live.tenant_of(key).name, "--name", name,
                     "--base-model", MODEL, "--path", str(folder), "--wait", "60", stdout=io.StringIO())
    client = lora_live.openai(key)
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=name, prompt=PROMPT, **GREEDY)
    assert info.value.status_code == 503 and info.value.body["code"] == "lora_not_found"
    assert client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).usage.completion_tokens == 8
