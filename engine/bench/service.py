"""Transport overhead: streamed requests through Redis to an engine process. Next to the offline
throughput of the same requests, the ratio of the two token rates is what the service layer costs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid

from engine.bench.stack import delete_keys
from engine.bench.workload import BenchRequest
from engine.cli_args import engine_flags
from engine.service.client import EngineClient
from engine.service.protocol import EngineRequest

REPLICA_TIMEOUT_S = 300


def run_through_redis(engine_options: dict, requests: list[BenchRequest], redis_url: str) -> dict:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "engine", "serve", "--redis-url", redis_url, "--key-prefix", prefix,
               *engine_flags(engine_options)]
    process = subprocess.Popen(command)
    try:
        return asyncio.run(_stream_all(redis_url, prefix, engine_options["model"], requests, process))
    finally:
        process.terminate()
        process.wait(timeout=60)
        delete_keys(redis_url, prefix)


async def _stream_all(redis_url: str, prefix: str, model: str, requests: list[BenchRequest],
                      process: subprocess.Popen) -> dict:
    client = EngineClient(redis_url, key_prefix=prefix)
    try:
        deadline = time.monotonic() + REPLICA_TIMEOUT_S
        while not await client.replicas(model):
            if process.poll() is not None:
                raise RuntimeError(f"the engine process exited with {process.returncode} before serving")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine process did not come up within {REPLICA_TIMEOUT_S} s")
            await asyncio.sleep(0.2)

        async def one(index: int, request: BenchRequest) -> int:
            params = {"temperature": 0.0, "max_tokens": request.max_tokens, "ignore_eos": True, "detokenize": False}
            stream = await client.submit(EngineRequest(f"bench-{index}", model, prompt_token_ids=request.prompt_token_ids,
                                                       params=params))
            async for delta in stream:
                if delta.error:
                    raise RuntimeError(f"request {index} failed: {delta.error}")
                if delta.finished:
                    return delta.usage.completion_tokens
            raise RuntimeError(f"request {index} ended without finishing")

        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
            "requests_per_s": len(requests) / elapsed}
