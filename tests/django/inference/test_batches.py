"""The Batch API end to end: the `openai` SDK against the live stack plus a real Celery worker."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import openai
import pytest
import redis

from inference.models import Batch
from tenants.models import ApiKey, UsageEvent
from tenants.ratelimit import RateLimitKeys

from tests.service.conftest import REPO_ROOT, _die_with_parent, wait_until

from tests.django.live_server import live_database_url

from .conftest import MODEL

pytestmark = pytest.mark.timeout(900)


class Worker:
    """`celery worker` processes on the live stack's queue (its own, so parallel runs never share)."""

    def __init__(self, live, log_dir) -> None:
        self.queue = f"{live.prefix}-tasks"
        self.env = {**os.environ, "DATABASE_URL": live_database_url(), "REDIS_URL": live.redis_url,
                    "ENGINE_KEY_PREFIX": live.prefix, "DJANGO_DEBUG": "1", "PYTHONUNBUFFERED": "1",
                    "BATCH_CONCURRENCY": "16"}
        self.log_dir, self.process, self.started = log_dir, None, 0

    def start(self) -> Worker:
        self.started += 1
        log = open(self.log_dir / f"celery-{self.started}.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "project", "worker", "--pool=threads", "--concurrency=2",
             "-Q", self.queue, "--loglevel=info", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-n", f"batch-test-{self.started}@%h"],
            cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def log_tail(self) -> str:
        return "\n".join((self.log_dir / f"celery-{n}.log").read_text(errors="replace")[-3000:]
                         for n in range(1, self.started + 1))


@pytest.fixture
def worker(live, tmp_path):
    running = Worker(live, tmp_path).start()
    yield running
    running.kill()
    print("--- celery log ---\n" + running.log_tail())


def chat_line(custom_id: str, content: str = "Say hi", max_tokens: int = 4, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                     "temperature": 0, **body}}


def upload(client: openai.OpenAI, lines: list) -> str:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return client.files.create(file=("input.jsonl", io.BytesIO(text.encode())), purpose="batch").id


def submit(client: openai.OpenAI, lines: list, endpoint: str = "/v1/chat/completions"):
    return client.batches.create(input_file_id=upload(client, lines), endpoint=endpoint, completion_window="24h",
                                 metadata={"job": "test"})


def wait_for(client: openai.OpenAI, batch_id: str, done, timeout: float = 600, worker: Worker | None = None):
    def check():
        if worker is not None:
            assert worker.process.poll() is None, f"worker exited:\n{worker.log_tail()}"
        batch = client.batches.retrieve(batch_id)
        return batch if done(batch) else None

    return wait_until(check, timeout, f"batch {batch_id}", interval=0.5)


def results(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [] if file_id is None else [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_batch_of_240_lines_survives_a_killed_worker(live, worker):
    key = live.new_key()
    client = live.openai(key)
    lines = [chat_line(f"req-{i}", content=f"Count to {i}.") for i in range(240)]
    batch = submit(client, lines)
    assert batch.status == "validating" and batch.metadata == {"job": "test"} and batch.object == "batch"
    running = wait_for(client, batch.id, lambda b: b.request_counts.completed >= 40, worker=worker)
    assert running.status == "in_progress" and running.request_counts.total == 240
    worker.kill()
    killed_at = client.batches.retrieve(batch.id).request_counts.completed
    assert killed_at < 240, "the batch finished before the worker was killed: make it longer"
    worker.start()
    done = wait_for(client, batch.id, lambda b: b.status in ("completed", "failed"), worker=worker)

    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (240, 240, 0)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.error_file_id is None
    output = results(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(f"req-{i}" for i in range(240))
    for line in output:
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"
        assert line["response"]["body"]["usage"]["completion_tokens"] <= 4
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"
    # Usage was recorded for every line, as for interactive calls; the usage total is on the batch.
    request_ids = {line["response"]["request_id"] for line in output}
    recorded = UsageEvent.objects.filter(tenant=live.tenant_of(key), endpoint="chat.completions")
    wait_until(lambda: request_ids <= set(recorded.values_list("request_id", flat=True)), 30, "the usage events")
    assert done.usage.output_tokens == sum(line["response"]["body"]["usage"]["completion_tokens"] for line in output)
    # The lines the killed worker had admitted gave their concurrency slots back when the batch
    # resumed, not 15 minutes later when their leases would have lapsed.
    api_key = ApiKey.objects.select_related("tenant").get(prefix=key.split(".")[0])
    leases = RateLimitKeys.for_api_key(api_key=api_key, key_prefix=live.prefix).leases
    assert redis.Redis.from_url(live.redis_url).zcard(leases) == 0


def test_cancel_stops_the_batch_with_partial_output(live, worker):
    client = live.openai(live.new_key())
    batch = submit(client, [chat_line(f"c-{i}", max_tokens=16) for i in range(300)])
    wait_for(client, batch.id, lambda b: b.request_counts.completed >= 5, worker=worker)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_for(client, batch.id, lambda b: b.status == "cancelled", timeout=300, worker=worker)
    assert 5 <= done.request_counts.completed < 300 and done.cancelled_at
    output, errors = results(client, done.output_file_id), results(client, done.error_file_id)
    assert len(output) == done.request_counts.completed
    assert sorted(line["custom_id"] for line in output + errors) == sorted(f"c-{i}" for i in range(300))
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    time.sleep(2)  # nothing runs after the cancel
    assert client.batches.retrieve(batch.id).request_counts.completed == done.request_counts.completed


def test_bad_lines_end_in_the_error_file(live, worker):
    client = live.openai(live.new_key())
    good = [chat_line("ok-1"), chat_line("ok-2")]
    bad = ["{not json", json.dumps(chat_line("ok-1")), json.dumps({**chat_line("get"), "method": "GET"}),
           json.dumps({**chat_line("url"), "url": "/v1/completions"}), json.dumps({**chat_line("body"), "body": []}),
           json.dumps(chat_line("field", max_tokens="four")), json.dumps(chat_line("stream", stream=True)),
           json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}})]
    batch = submit(client, [*good, *bad])
    done = wait_for(client, batch.id, lambda b: b.status == "completed", timeout=300, worker=worker)
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (10, 2, 8)
    assert sorted(line["custom_id"] for line in results(client, done.output_file_id)) == ["ok-1", "ok-2"]
    error_lines = results(client, done.error_file_id)
    assert len(error_lines) == 8
    errors = {line["custom_id"]: line for line in error_lines}
    assert [line["error"]["code"] for line in error_lines if line["custom_id"] is None] == ["invalid_request"] * 2
    assert "unique" in errors["ok-1"]["error"]["message"]
    for custom_id in ("get", "url", "body"):
        assert errors[custom_id]["error"]["code"] == "invalid_request" and errors[custom_id]["response"] is None
    for custom_id in ("field", "stream"):
        response = errors[custom_id]["response"]
        assert response["status_code"] == 400 and response["body"]["error"]["param"] in ("max_tokens", "stream")


def test_completions_endpoint_and_listing(live, worker):
    client = live.openai(live.new_key())
    line = {"custom_id": "p", "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "Hello", "max_tokens": 3}}
    first = submit(client, [line], endpoint="/v1/completions")
    second = submit(client, [line], endpoint="/v1/completions")
    done = wait_for(client, first.id, lambda b: b.status == "completed", timeout=300, worker=worker)
    assert results(client, done.output_file_id)[0]["response"]["body"]["object"] == "text_completion"
    page = client.batches.list(limit=1)
    assert [b.id for b in page.data] == [second.id] and page.has_more
    assert [b.id for b in client.batches.list(limit=5, after=second.id).data] == [first.id]


def test_tenants_never_see_each_others_files_or_batches(live):
    owner, stranger = live.openai(live.new_key()), live.openai(live.new_key())
    file_id = upload(owner, [chat_line("x")])
    batch = owner.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    for attempt in (lambda: stranger.files.retrieve(file_id), lambda: stranger.files.content(file_id),
                    lambda: stranger.files.delete(file_id), lambda: stranger.batches.retrieve(batch.id),
                    lambda: stranger.batches.cancel(batch.id),
                    lambda: stranger.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                    completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert stranger.batches.list().data == []
    assert owner.files.retrieve(file_id).id == file_id
    assert owner.batches.retrieve(batch.id).status in ("validating", "cancelling")
    owner.batches.cancel(batch.id)
    assert Batch.objects.get(pk=batch.id).status == "cancelling"  # no worker here: nothing takes it further
    assert owner.files.delete(file_id).deleted and owner.batches.retrieve(batch.id).input_file_id == file_id


def test_upload_checks(live):
    client = live.openai(live.new_key())
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=upload(client, [chat_line("a")]), endpoint="/v1/embeddings",
                              completion_window="24h")


def test_batch_lines_carry_response_format_and_tools(live, worker):
    """Batch lines go through the API's own path: structured outputs and tool choice hold there too,
    and a schema the grammar library refuses fails only its line."""
    client = live.openai(live.new_key())
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}}, "required": ["name"],
              "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "lookup", "parameters": schema}}
    lines = [chat_line("json", "A name as JSON.", max_tokens=60, response_format={
                 "type": "json_schema", "json_schema": {"name": "n", "schema": schema}}),
             chat_line("tool", "Look up Ada.", max_tokens=60, tools=[tool],
                       tool_choice={"type": "function", "function": {"name": "lookup"}}),
             chat_line("bad", response_format={"type": "json_schema", "json_schema": {
                 "name": "n", "schema": {"type": "objectx"}}})]
    done = wait_for(client, submit(client, lines).id, lambda b: b.status == "completed", timeout=300, worker=worker)
    output = {line["custom_id"]: line["response"]["body"] for line in results(client, done.output_file_id)}
    assert json.loads(output["json"]["choices"][0]["message"]["content"]).keys() == {"name"}
    [call] = output["tool"]["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "lookup" and "name" in json.loads(call["function"]["arguments"])
    [error] = results(client, done.error_file_id)
    assert error["custom_id"] == "bad" and error["response"]["body"]["error"]["param"] == "response_format"
