"""The replica's reply writer and client watch against a real Redis (no engine)."""

from __future__ import annotations

import uuid

import pytest
import redis

from engine.service import replies
from engine.service.protocol import CompletionDelta, OutputDelta, decode_deltas
from engine.service.replies import ClientWatch, ReplyWriter
from engine.service.transport import GROUP, Keys


@pytest.fixture
def keys(redis_url):
    keys = Keys(f"test-{uuid.uuid4().hex[:12]}")
    yield keys
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{keys.prefix}:*"):
        client.delete(key)
    client.close()


@pytest.fixture
def client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def entries_of(client, keys: Keys, client_id: str) -> list[list[OutputDelta]]:
    return [decode_deltas(fields[b"data"]) for _, fields in client.xrange(keys.reply(client_id))]


def test_one_entry_per_client_per_flush_and_acks_after_the_deltas(client, keys):
    stream = keys.requests("m")
    client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    entry = client.xadd(stream, {"data": b"x"})
    client.xreadgroup(GROUP, "r1", {stream: ">"})
    a1, a2 = OutputDelta("a-1", 0, replica_id="r1"), OutputDelta("a-2", 3, [CompletionDelta(0, "hi", [5])])
    b1 = OutputDelta("b-1", 7, finished=True)
    ReplyWriter(keys).flush(client, stream, [("delta", "web-a", a1), ("ack", entry), ("delta", "web-b", b1),
                                             ("delta", "web-a", a2)])
    assert entries_of(client, keys, "web-a") == [[a1, a2]]
    assert entries_of(client, keys, "web-b") == [[b1]]
    assert client.xpending(stream, GROUP)["pending"] == 0
    assert 0 < client.ttl(keys.reply("web-a")) <= 600


def test_a_steps_deltas_in_one_item_keep_their_order_among_single_deltas(client, keys):
    """The replica hands the writer each step's deltas as one ("deltas", [...]) item."""
    stream = keys.requests("m")
    note, first, second = OutputDelta("a-1", 0), OutputDelta("a-1", 1, [CompletionDelta(0, "x", [1])]), \
        OutputDelta("b-1", 1, [CompletionDelta(0, "y", [2])], finished=True)
    writer = ReplyWriter(keys)
    writer.flush(client, stream, [("delta", "web-a", note), ("deltas", [("web-a", first), ("web-b", second)])])
    assert entries_of(client, keys, "web-a") == [[note, first]]
    assert entries_of(client, keys, "web-b") == [[second]]
    assert [delta for _, _, delta in writer.recent_finals] == [second]


def test_final_deltas_are_sent_again_after_a_redis_restart(client, keys):
    writer = ReplyWriter(keys)
    running, final = OutputDelta("a-1", 4), OutputDelta("a-2", 9, finished=True)
    writer.flush(client, keys.requests("m"), [("delta", "web-a", running), ("delta", "web-a", final)])
    client.delete(keys.reply("web-a"))  # what a restart without persistence does
    writer.resend_finals(client)
    assert entries_of(client, keys, "web-a") == [[final]]


def test_a_client_is_gone_only_after_its_key_has_been_missing_a_while(client, keys, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(replies.time, "monotonic", lambda: now[0])
    watch = ClientWatch(keys)
    client.set(keys.client("alive"), b"1", ex=60)
    assert watch.gone(client, ["alive", "dead"]) == []  # missing once: maybe Redis just restarted
    now[0] += replies.GONE_AFTER_S - 0.1
    assert watch.gone(client, ["alive", "dead"]) == []
    now[0] += 0.2
    assert watch.gone(client, ["alive", "dead"]) == ["dead"]
    client.set(keys.client("dead"), b"1", ex=60)  # it came back after all
    assert watch.gone(client, ["alive", "dead"]) == []


def test_a_loop_that_ends_without_closing_its_client_still_ends(redis_url):
    """asyncio.run cancels the client's background tasks at its end; a cancel that redis-py swallows
    inside a blocking read must not keep the loop (and so the program) running."""
    import subprocess
    import sys

    script = ("import asyncio\nfrom engine.service.client import EngineClient\n"
              "async def main():\n"
              f"    client = EngineClient({redis_url!r}, key_prefix='test-unclosed')\n"
              "    await client.models()\n    await asyncio.sleep(1.5)\n"
              "asyncio.run(main())\n")
    assert subprocess.run([sys.executable, "-c", script], timeout=30).returncode == 0
