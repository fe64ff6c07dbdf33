"""python -m engine.bench.queue_watch: how fast requests reach Redis and the replica, over time.

The offline benchmark hands the engine all its requests at once; over HTTP they arrive as fast as
the web workers admit them and the replica reads them. Every interval this reads, for every request
stream in Redis, how many entries were ever added (by the web side) and read by the replicas'
group (by a replica's reader), and every replica's heartbeat (running, waiting, queued):

    python -m engine.bench.queue_watch --out queue.json [--redis-url URL] [--interval 0.1] [--duration S]

It stops at SIGTERM, SIGINT or after --duration and writes the file. Times are
`time.perf_counter()`, as in the serving benchmark's request records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import redis

from engine.bench.cpu_usage import repeat_until_stopped
from engine.service.protocol import decode_heartbeat

HEARTBEAT_FIELDS = ("num_running", "num_waiting", "queue_depth", "step_seconds", "tokens_per_s", "sent_at")


class Watch:
    """Readings of one Redis; the keyspace is scanned for streams and heartbeats only every few
    seconds, so that watching adds three commands per reading to the Redis being measured."""

    RESCAN_S = 2.0

    def __init__(self, client: redis.Redis) -> None:
        self.client, self.streams, self.heartbeats, self.scanned = client, [], [], -math.inf

    def poll(self) -> dict:
        if time.monotonic() - self.scanned > self.RESCAN_S:
            self.streams = list(self.client.scan_iter(match="*:requests:*", count=1000, _type="stream"))
            self.heartbeats = list(self.client.scan_iter(match="*:hb:*", count=1000))
            self.scanned = time.monotonic()
        pipe = self.client.pipeline(transaction=False)
        for key in self.streams:
            pipe.xinfo_stream(key).xinfo_groups(key)
        for key in self.heartbeats:
            pipe.get(key)
        answers = pipe.execute(raise_on_error=False)
        streams, replicas = {}, {}
        for key, info, groups in zip(self.streams, answers[0::2], answers[1::2]):
            if not isinstance(info, Exception) and not isinstance(groups, Exception):
                streams[key.decode()] = {"added": info.get("entries-added"), "length": info["length"],
                                         "read": sum(g.get("entries-read") or 0 for g in groups),
                                         "pending": sum(g["pending"] for g in groups)}
        for data in answers[2 * len(self.streams):]:
            if isinstance(data, bytes):
                beat = asdict(decode_heartbeat(data))
                replicas[beat["replica_id"]] = {name: beat[name] for name in HEARTBEAT_FIELDS}
        return {"t": round(time.perf_counter(), 4), "streams": streams, "replicas": replicas}


def run(redis_url: str, out: str, interval: float, duration: float | None) -> list[dict]:
    watch, readings = Watch(redis.Redis.from_url(redis_url, socket_timeout=5)), []

    def read() -> None:
        try:
            readings.append(watch.poll())
        except redis.RedisError as error:  # not up yet, or going down: the gap shows in the times
            readings.append({"t": round(time.perf_counter(), 4), "error": str(error)})

    repeat_until_stopped(read, interval, duration)
    Path(out).write_text(json.dumps({"interval": interval, "readings": readings}))
    return readings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.queue_watch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="write the readings here")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between readings")
    parser.add_argument("--duration", type=float, help="seconds to watch (default: until SIGTERM)")
    args = parser.parse_args(argv)
    readings = run(args.redis_url, args.out, args.interval, args.duration)
    print(f"queue watch: {len(readings)} readings, {sum('error' in r for r in readings)} failed", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
