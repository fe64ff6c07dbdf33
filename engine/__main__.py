"""python -m engine serve|generate|bench: the engine from the command line.

`serve` runs an engine replica that takes requests from Redis; `generate` runs prompts through
the offline API; `bench` is `python -m engine.bench`.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.cli_args import add_engine_args, engine_config_from_args
from engine.config import BUNDLED_MODEL


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from engine.bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="benchmarks (see python -m engine bench --help)", add_help=False)
    serve = sub.add_parser("serve", help="serve a model to requests arriving over Redis")
    serve.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    serve.add_argument("--served-model-name", help="the name clients ask for (default: --model)")
    serve.add_argument("--key-prefix", default="llm", help="prefix of every Redis key")
    serve.add_argument("--replica-id", help="default: host-pid-random")
    serve.add_argument("--reclaim-idle", type=float, default=30.0,
                       help="seconds after which a request read by a stuck replica is taken over (one whose "
                            "heartbeat has stopped: after a second)")
    serve.add_argument("--max-queued", type=int,
                       help="requests the replica holds at once, running or waiting (default 1.5 x --max-num-seqs: "
                            "more fills the batch sooner when many finish together; less leaves more for others)")
    serve.add_argument("--max-stream-interval", type=int, default=2,
                       help="while the host cannot keep up with the device (async scheduling only), stream up to "
                            "this many tokens per delta instead of --stream-interval's (engine/service/"
                            "stream_pacing.py); 1 streams every token always")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds to finish in-flight requests after SIGTERM")
    serve.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                       help="LoRA adapters to register for the model at start (with --enable-lora); more can be "
                            "registered in Redis while it runs (engine/service/lora_control.py)")
    add_engine_args(serve)
    gen = sub.add_parser("generate", help="generate text for prompts")
    gen.add_argument("prompts", nargs="+", help="prompt texts")
    gen.add_argument("--model", default=BUNDLED_MODEL)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--tensor-parallel-size", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)

    from engine import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, tensor_parallel_size=args.tensor_parallel_size)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outputs = llm.generate(args.prompts, params)
    for prompt, output in zip(args.prompts, outputs):
        print(f"=== {prompt}\n{output.outputs[0].text.strip()}\n")
    return 0


def _serve(args) -> int:
    import logging

    from engine.llm_engine import LLMEngine
    from engine.service.server import EngineServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine import tracing

    if tracing.configure("llm-engine"):
        logging.getLogger(__name__).info("tracing: spans go to %s", os.environ[tracing.ENDPOINT_VARIABLE])
    lora_modules = _parse_lora_modules(args.lora_modules)
    engine = LLMEngine(engine_config_from_args(args))
    if lora_modules:
        _register_lora_modules(args, lora_modules)
    status = EngineServer(engine, args.redis_url, args.served_model_name or args.model, key_prefix=args.key_prefix,
                          replica_id=args.replica_id, reclaim_idle_s=args.reclaim_idle,
                          shutdown_timeout_s=args.shutdown_timeout, max_queued=args.max_queued,
                          max_stream_interval=args.max_stream_interval).serve_forever()
    engine.shutdown()  # a group that lost an NCCL rank is left to parallel_state's exit hook
    return status


def _parse_lora_modules(items: list[str]) -> dict[str, str]:
    modules = {}
    for item in items:
        name, _, path = item.partition("=")
        if not name or not path:
            raise SystemExit(f"--lora-modules takes NAME=PATH, got {item!r}")
        modules[name] = path
    return modules


def _register_lora_modules(args, modules: dict[str, str]) -> None:
    """Put the adapters in the model's registry in Redis; every replica of the model loads them."""
    import redis

    from engine.service.lora_control import register_adapter

    client = redis.Redis.from_url(args.redis_url)
    for name, path in modules.items():
        register_adapter(client, args.served_model_name or args.model, name, os.path.abspath(path),
                         key_prefix=args.key_prefix)
    client.close()


if __name__ == "__main__":
    sys.exit(main())
