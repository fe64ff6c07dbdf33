"""A replica's side of the reply streams: writing each step's deltas to the clients that asked,
and noticing clients that went away. Both run on the replica's writer thread."""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque

import redis

from engine.service.protocol import OutputDelta, encode_deltas
from engine.service.transport import GROUP, OUTPUT_TTL_S, REPLY_MAXLEN, Keys

logger = logging.getLogger(__name__)
RESEND_FINALS_S = 30.0  # final deltas kept this long, to send again if Redis restarts and loses them
GONE_AFTER_S = 3.0  # a client's liveness key missing this long (it expires CLIENT_TTL_S after the last refresh)


class ReplyWriter:
    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.recent_finals: deque[tuple[float, str, OutputDelta]] = deque()  # (sent at, client, delta)

    def flush(self, client: redis.Redis, stream: str, batch: list[tuple]) -> None:
        """`batch`: ("delta", client id, OutputDelta), ("deltas", [(client id, OutputDelta), ...])
        (a step's) and ("ack", entry id) items, in the order the main thread made them. One XADD per
        client with everything for it, then the acks and the deletion of the acked entries (an entry
        is never acked while its client knows no replica that holds it): one round trip in all."""
        by_client: dict[str, list[OutputDelta]] = defaultdict(list)
        acks = []
        now = time.monotonic()
        for kind, *item in batch:
            if kind == "ack":
                acks.append(item[0])
                continue
            for reply_to, delta in (item[0] if kind == "deltas" else [item]):
                by_client[reply_to].append(delta)
                if delta.finished:
                    self.recent_finals.append((now, reply_to, delta))
        pipe = client.pipeline(transaction=False)
        self._add(pipe, by_client)
        if acks:  # taken: the entry is of no more use (a crash before this leaves it pending, to reclaim)
            pipe.xack(stream, GROUP, *acks)
            pipe.xdel(stream, *acks)
        pipe.execute()
        while self.recent_finals and self.recent_finals[0][0] < time.monotonic() - RESEND_FINALS_S:
            self.recent_finals.popleft()

    def resend_finals(self, client: redis.Redis) -> None:
        """Redis restarted: the last deltas of requests that ended lately may have been lost unread,
        and their clients would wait for them in vain. Send them again; a client that did read them
        ignores the repeat (its seq is behind), one that lost earlier deltas sees the gap."""
        logger.warning("Redis restarted; sending the last deltas of %d recent requests again", len(self.recent_finals))
        by_client: dict[str, list[OutputDelta]] = defaultdict(list)
        for _, reply_to, delta in self.recent_finals:
            by_client[reply_to].append(delta)
        pipe = client.pipeline(transaction=False)
        self._add(pipe, by_client)
        pipe.execute()

    def _add(self, pipe, by_client: dict[str, list[OutputDelta]]) -> None:
        for reply_to, deltas in by_client.items():
            key = self.keys.reply(reply_to)
            pipe.xadd(key, {"data": encode_deltas(deltas)}, maxlen=REPLY_MAXLEN, approximate=True)
            pipe.expire(key, OUTPUT_TTL_S)


class ClientWatch:
    """Which clients are gone: their liveness key has been missing for GONE_AFTER_S (a moment's
    absence, such as a Redis restart that a live client fills again within CLIENT_REFRESH_S, is not
    enough). A killed web process's requests are aborted CLIENT_TTL_S + GONE_AFTER_S after it died."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.missing_since: dict[str, float] = {}

    def gone(self, client: redis.Redis, names: list[str]) -> list[str]:
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.exists(self.keys.client(name))
        now, gone = time.monotonic(), []
        for name, alive in zip(names, pipe.execute()):
            if alive:
                self.missing_since.pop(name, None)
            elif now - self.missing_since.setdefault(name, now) >= GONE_AFTER_S:
                gone.append(name)
        for name in set(self.missing_since) - set(names):  # no requests left to care about
            del self.missing_since[name]
        return gone
