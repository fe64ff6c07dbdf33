"""Transport overhead: the same streamed requests through Redis to an engine process, and through
`LLM` in this process. The ratio of the two token rates is what the service layer costs."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
import uuid

import redis

from engine.bench.throughput import run_engine_throughput
from engine.bench.workload import BenchRequest
from engine.cli_args import engine_flags
from engine.service.client import EngineClient
from engine.service.protocol import EngineRequest


def run_service_comparison(engine_options: dict, requests: list[BenchRequest], redis_url: str) -> dict:
    from engine.llm import LLM

    llm = LLM(**engine_options)
    in_process = run_engine_throughput(llm, requests, ignore_eos=True)
    del llm
    gc.collect()

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    model = engine_options["model"]
    command = [sys.executable, "-m", "engine", "serve", "--redis-url", redis_url, "--key-prefix", prefix,
               *engine_flags(engine_options)]
    process = subprocess.Popen(command)
    try:
        through_redis = asyncio.run(_stream_all(redis_url, prefix, model, requests))
    finally:
        process.terminate()
        process.wait(timeout=60)
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
    return {"in_process": in_process, "through_redis": through_redis,
            "ratio": through_redis["output_tokens_per_s"] / in_process["output_tokens_per_s"]}


async def _stream_all(redis_url: str, prefix: str, model: str, requests: list[BenchRequest]) -> dict:
    client = EngineClient(redis_url, key_prefix=prefix)
    try:
        deadline = time.monotonic() + 300
        while not await client.replicas(model):
            if time.monotonic() > deadline:
                raise RuntimeError("the engine process did not come up within 300 s")
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
