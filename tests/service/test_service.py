"""Submit, stream and abort through Redis against one real engine replica shared by the module
(`python -m engine serve` with the bundled model, max_model_len 128), using the real EngineClient.

The replica runs with async scheduling (the GPU default; off by default on the CPU), so streaming,
stop strings, aborts and deadlines are all checked with a step planned ahead of the last. The
offline reference for greedy parity is an in-process `LLM` on the same bundled model without it;
every request here runs alone, so the replica's batch matches the reference's.
"""

from __future__ import annotations

import asyncio
import socket
import time

import msgpack
import pytest

from engine.service.client import EngineClient, EngineUnavailable
from engine.service.protocol import EngineRequest, encode

MAX_MODEL_LEN = 128
REPLICA_ID = "shared"

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def replica_process(module_service):
    """The shared replica, started (not yet ready) so that it loads while the test process loads
    its offline reference."""
    return module_service.start_replica(REPLICA_ID, "--max-model-len", str(MAX_MODEL_LEN), "--async-scheduling",
                                        wait=False)


@pytest.fixture(scope="module")
def replica(replica_process):
    return replica_process.wait_ready()


@pytest.fixture(scope="module")
def offline_llm(replica_process):
    from engine import LLM

    return LLM(dtype="float32", num_gpu_blocks_override=256)


@pytest.fixture
def svc(module_service, replica):
    """The module's Service, once its replica is ready; checks the replica survived each test."""
    yield module_service
    assert replica.alive(), replica.log_tail()


def offline_greedy(llm, prompt, max_tokens):
    from engine import SamplingParams

    [output] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return output


def wait_idle(svc, replica, timeout=30.0):
    """Until a heartbeat sent after this call shows nothing running or waiting; returns that heartbeat.

    Only a fresh heartbeat counts: one sent before the caller's last request reached the replica
    (they come once a second) would show it idle with none of that request's effects.
    """
    since = time.time()
    return svc.wait_until(lambda: (hb := replica.heartbeat()) and hb.sent_at > since and hb.num_running == 0
                          and hb.num_waiting == 0 and hb.queue_depth == 0 and hb,
                          timeout, "the replica to become idle", interval=0.2)


# -- submit and stream --------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):",
                                    "<|im_start|>user\nName a large planet.<|im_end|>\n<|im_start|>assistant\n"])
def test_streamed_deltas_add_up_to_the_offline_greedy_output(offline_llm, svc, prompt):
    expected = offline_greedy(offline_llm, prompt, 24)
    request = svc.request(prompt, max_tokens=24)

    async def main():
        async with svc.client() as client:
            return await svc.run(client, request)

    deltas = asyncio.run(main())
    svc.assert_completed(deltas)
    assert svc.text_of(deltas) == expected.outputs[0].text
    assert svc.token_ids_of(deltas) == list(expected.outputs[0].token_ids)
    last = deltas[-1]
    assert last.outputs[-1].finish_reason == expected.outputs[0].finish_reason
    assert last.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert last.usage.completion_tokens == len(expected.outputs[0].token_ids)
    # Streamed, not one lump at the end; in order; all from the one replica.
    assert sum(1 for d in deltas if d.outputs) > 1
    assert [d.seq for d in deltas] == list(range(1, len(deltas) + 1))
    assert {d.request_id for d in deltas} == {request.request_id}
    assert {d.replica_id for d in deltas} == {REPLICA_ID}


def test_token_id_prompt(offline_llm, svc):
    token_ids = offline_llm.get_tokenizer().encode("Water boils at")
    expected = offline_greedy(offline_llm, {"prompt_token_ids": token_ids}, 16)
    request = svc.request(token_ids, max_tokens=16)
    assert request.prompt is None and request.prompt_token_ids == token_ids

    async def main():
        async with svc.client() as client:
            return await svc.run(client, request)

    deltas = asyncio.run(main())
    svc.assert_completed(deltas)
    assert svc.token_ids_of(deltas) == list(expected.outputs[0].token_ids)
    assert svc.text_of(deltas) == expected.outputs[0].text
    assert deltas[-1].usage.prompt_tokens == len(token_ids)


def test_many_concurrent_requests_all_complete(svc, replica):
    prompts = [f"Request number {i} says:" for i in range(16)]

    async def main():
        async with svc.client() as client:
            requests = [svc.request(p, max_tokens=12, ignore_eos=True) for p in prompts]
            return requests, await asyncio.gather(*(svc.run(client, r, timeout=150) for r in requests))

    requests, results = asyncio.run(main())
    for request, deltas in zip(requests, results):
        svc.assert_completed(deltas, max_tokens=12)
        assert {d.request_id for d in deltas} == {request.request_id}
    assert len({r.request_id for r in requests}) == 16
    wait_idle(svc, replica)


def test_stop_string_and_usage(svc):
    request = svc.request("Count: 1, 2, 3, 4,", max_tokens=32, stop=[","])

    async def main():
        async with svc.client() as client:
            return await svc.run(client, request)

    deltas = asyncio.run(main())
    svc.assert_completed(deltas)
    assert "," not in svc.text_of(deltas)
    assert deltas[-1].outputs[-1].finish_reason == "stop"
    assert deltas[-1].usage.completion_tokens == len(svc.token_ids_of(deltas)) < 32


def test_unknown_model_raises_engine_unavailable(svc):
    request = EngineRequest(request_id="req-unknown", model="no-such-model", prompt="hi")

    async def main():
        async with svc.client() as client:
            with pytest.raises(EngineUnavailable, match="no-such-model"):
                await client.submit(request)
            # Nothing was queued for a model nobody serves.
            assert not await client.redis.exists(svc.keys.requests("no-such-model"))

    asyncio.run(main())


def test_unreachable_redis_raises_engine_unavailable(svc):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"

    async def main():
        client = EngineClient(url, key_prefix=svc.prefix)
        try:
            with pytest.raises(EngineUnavailable, match="Redis"):
                await client.submit(svc.request("Hi"))
        finally:
            await client.close()

    asyncio.run(main())


def test_models_lists_the_replica_from_its_heartbeat(svc, replica):
    async def main():
        async with svc.client() as client:
            return await client.models(), await client.replicas(svc.MODEL)

    models, replicas = asyncio.run(main())
    assert list(models) == [svc.MODEL]
    [beat] = models[svc.MODEL]
    assert [r.replica_id for r in replicas] == [REPLICA_ID]
    assert beat.replica_id == REPLICA_ID and beat.model == svc.MODEL
    assert beat.max_model_len == MAX_MODEL_LEN
    assert beat.tokens_per_s >= 0
    assert 0.0 <= beat.kv_cache_usage <= 1.0
    assert beat.num_running >= 0 and beat.num_waiting >= 0 and beat.queue_depth >= 0
    assert abs(time.time() - beat.sent_at) < 10


def test_heartbeat_reports_recent_throughput(svc, replica):
    """After the requests above, the last minute's tokens/s is positive."""
    async def main():
        async with svc.client() as client:
            await svc.run(client, svc.request("Hello", max_tokens=8, ignore_eos=True))

    asyncio.run(main())
    svc.wait_until(lambda: (hb := replica.heartbeat()) and hb.tokens_per_s > 0, 10, "tokens_per_s > 0")


# -- abort ----------------------------------------------------------------------------------------


def test_closing_the_stream_aborts_the_request(svc, replica):
    max_tokens = MAX_MODEL_LEN - 16
    request = svc.request("Write a very long story about a dragon.", max_tokens=max_tokens, ignore_eos=True)

    async def main():
        async with svc.client() as client:
            stream = await client.submit(request)
            async with asyncio.timeout(60):
                async for delta in stream:
                    if delta.outputs:
                        break
            await stream.aclose()  # the client went away

    aborted_before = replica.heartbeat().num_aborted
    asyncio.run(main())
    beat = wait_idle(svc, replica)
    assert beat.kv_cache_usage == 0.0, "the aborted request's KV blocks were not freed"
    assert beat.num_aborted == aborted_before + 1, "the request ran to the end instead of being aborted"


def test_client_abort_ends_the_request(svc, replica):
    """`client.abort(id)` (e.g. from another task) stops the work and ends the stream promptly."""
    max_tokens = MAX_MODEL_LEN - 16
    request = svc.request("Write a very long story about a knight.", max_tokens=max_tokens, ignore_eos=True)

    async def main():
        async with svc.client() as client:
            stream = await client.submit(request, timeout_s=120)
            deltas = []
            async with asyncio.timeout(60):
                async for delta in stream:
                    deltas.append(delta)
                    if delta.outputs:
                        break
            await client.abort(request.request_id)
            await asyncio.to_thread(wait_idle, svc, replica)  # the replica stopped the request
            return deltas + await svc.collect(stream, timeout=15)  # ... and the stream must end

    deltas = asyncio.run(main())
    assert deltas[-1].finished
    assert len(svc.token_ids_of(deltas)) < max_tokens


def test_request_aborted_while_queued_never_runs(svc, replica):
    """An abort that arrives while the request still waits in Redis (the replica is full) drops
    it when the replica reads it: no output, and its entry is acknowledged."""
    fill = [svc.request(f"Filler {i}:", max_tokens=MAX_MODEL_LEN - 28, ignore_eos=True) for i in range(24)]
    for request in fill:  # 24 = the replica's room (1.5 x max_num_seqs 16)
        request.deadline = time.time() + 120
        svc.enqueue(request)
    svc.wait_until(lambda: (hb := replica.heartbeat()) and hb.num_running + hb.num_waiting == len(fill),
                   60, "the replica to hold all filler requests")
    queued = svc.request("Never run me", max_tokens=8)
    queued.deadline = time.time() + 120
    entry = svc.entry_order(svc.enqueue(queued))
    time.sleep(0.5)
    assert svc.last_delivered() < entry, "precondition: the request is still queued in Redis"

    async def abort_all():
        async with svc.client() as client:
            await client.abort(queued.request_id)
            for request in fill:
                await client.abort(request.request_id)

    asyncio.run(abort_all())
    wait_idle(svc, replica)
    svc.wait_until(lambda: svc.last_delivered() >= entry, 30, "the replica to read the aborted request")
    svc.wait_until(lambda: svc.pending_count() == 0, 30, "no pending entries")
    time.sleep(0.5)  # anything it would have written is in Redis by now
    assert svc.deltas_in_redis(queued.request_id) == [], "the aborted request ran"


# -- requests that cannot run ---------------------------------------------------------------------


@pytest.mark.parametrize("prompt, message", [
    ("hello " * 200, "max_model_len"),
    ([1, 2, 10**9], "token ids"),
])
def test_unservable_request_gets_an_invalid_request_error(svc, prompt, message):
    request = svc.request(prompt)

    async def main():
        async with svc.client() as client:
            return await svc.run(client, request, timeout=60)

    deltas = asyncio.run(main())
    assert len(deltas) == 1 and deltas[0].finished
    assert svc.error_code(deltas) == "invalid_request"
    assert message in deltas[0].error["message"]
    assert deltas[0].replica_id == REPLICA_ID


def test_deadline_in_the_past_is_refused_by_the_replica(svc):
    """Straight onto the stream (as a client with a slow clock would): the replica refuses it."""
    request = svc.request("Hello", max_tokens=8)
    request.deadline = time.time() - 5
    svc.enqueue(request)
    deltas = svc.read_output(request.request_id, timeout=60)
    assert len(deltas) == 1
    assert svc.error_code(deltas) == "deadline_exceeded"


def test_deadline_in_the_past_through_the_client_ends_at_once(svc):
    request = svc.request("Hello", max_tokens=8)
    request.deadline = time.time() - 5

    async def main():
        async with svc.client() as client:
            started = time.monotonic()
            deltas = await svc.run(client, request, timeout=30)
            return deltas, time.monotonic() - started

    deltas, elapsed = asyncio.run(main())
    assert len(deltas) == 1 and deltas[0].finished
    assert svc.error_code(deltas) in ("deadline_exceeded", "timeout")
    assert elapsed < 15


def test_short_timeout_on_a_long_generation_ends_with_an_error(svc, replica):
    max_tokens = MAX_MODEL_LEN - 16
    request = svc.request("Tell me everything about the sea.", max_tokens=max_tokens, ignore_eos=True)

    async def main():
        async with svc.client() as client:
            started = time.monotonic()
            deltas = await svc.run(client, request, timeout=60, timeout_s=1.0)
            return deltas, time.monotonic() - started

    deltas, elapsed = asyncio.run(main())
    assert deltas[-1].finished
    assert svc.error_code(deltas) in ("timeout", "deadline_exceeded")
    assert len(svc.token_ids_of(deltas)) < max_tokens
    assert elapsed < 30
    wait_idle(svc, replica)  # the replica dropped it too


# -- malformed messages -----------------------------------------------------------------------------


def test_malformed_messages_go_to_the_dead_letter_stream(svc, replica):
    good = svc.request("Hi")
    bad_params = msgpack.unpackb(encode(svc.request("Hi")), raw=False)
    bad_params["params"] = {"temperature": -1.0}
    wrong_version = {**msgpack.unpackb(encode(svc.request("Hi")), raw=False), "v": 99}
    entries = {
        svc.enqueue_raw({"data": b"\x00\xffthis is not msgpack"}): "msgpack",
        svc.enqueue_raw({"data": msgpack.packb(bad_params)}): "temperature",
        svc.enqueue_raw({"data": msgpack.packb(wrong_version)}): "version",
        svc.enqueue_raw({"payload": b"no data field"}): "",
    }

    def dead_letters():
        client = svc.sync_redis()
        try:
            found = {fields[b"entry_id"]: fields for _, fields in client.xrange(svc.keys.dead_letter)}
        finally:
            client.close()
        return found if set(entries) <= set(found) else None

    found = svc.wait_until(dead_letters, 30, "the malformed messages in the dead-letter stream")
    for entry_id, reason_word in entries.items():
        fields = found[entry_id]
        assert fields[b"reason"], fields
        assert reason_word.encode() in fields[b"reason"], fields
        assert fields[b"stream"] == svc.keys.requests(svc.MODEL).encode()
    assert found[next(iter(entries))][b"data"] == b"\x00\xffthis is not msgpack"

    # The replica goes on serving, and nothing is left pending.
    async def main():
        async with svc.client() as client:
            return await svc.run(client, good, timeout=60)

    svc.assert_completed(asyncio.run(main()))
    assert replica.alive()
    svc.wait_until(lambda: svc.pending_count() == 0, 10, "no pending entries")


# -- what the web side needs: the model card and prompt logprobs ---------------------------------


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a planet, ünïcode 😀"}],
]


def test_model_card_lets_the_web_side_tokenize_exactly_like_the_engine(svc, replica, offline_llm):
    from inference.prompt_tokenizer import PromptTokenizer

    async def card():
        async with svc.client() as client:
            return await client.model_card(svc.MODEL), await client.known_models()

    model_card, known = asyncio.run(card())
    assert known == {svc.MODEL} and model_card.max_model_len == MAX_MODEL_LEN
    web, engine = PromptTokenizer(model_card), offline_llm.get_tokenizer()
    for text in ("The capital of France is", "  spaces\tand\nlines ünïcode 😀", "<|im_start|>user"):
        assert web.encode(text) == engine.encode(text)
    for conversation in CONVERSATIONS:
        ids = engine.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert web.encode_chat(conversation) == list(ids)


def test_prompt_logprobs_arrive_once_with_the_first_tokens(svc, offline_llm):
    from engine import SamplingParams

    prompt = "The capital of France is"
    deltas = asyncio.run(_run(svc, svc.request(prompt, prompt_logprobs=1, max_tokens=3)))
    carrying = [d for d in deltas if d.prompt_logprobs is not None]
    assert len(carrying) == 1 and carrying[0].outputs
    [expected] = offline_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                                      use_tqdm=False)
    wire = carrying[0].prompt_logprobs
    assert wire[0] is None and len(wire) == len(expected.prompt_token_ids)
    for position, token_id in enumerate(expected.prompt_token_ids[1:], start=1):
        assert wire[position][token_id][0] == pytest.approx(expected.prompt_logprobs[position][token_id].logprob,
                                                            abs=1e-4)


async def _run(svc, request):
    async with svc.client() as client:
        return await svc.run(client, request)
