"""python -m engine.bench throughput|latency [--compare-hf] ...: vLLM-style benchmarks.

Both engines run in this one process on the same requests, so the printed ratio is like for like.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict

from engine.bench.workload import LengthRange, make_workload
from engine.cli_args import add_engine_args, engine_config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("throughput", "offline throughput of many requests"),
                            ("latency", "end-to-end latency of one batch"),
                            ("service", "streamed requests through Redis to an engine process vs in-process")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--input-len", type=LengthRange.parse, default=LengthRange.parse("256" if name == "throughput" else "32"),
                       help="prompt length: N or LOW-HIGH")
        p.add_argument("--output-len", type=LengthRange.parse, default=LengthRange.parse("256" if name == "throughput" else "128"),
                       help="max_tokens: N or LOW-HIGH")
        p.add_argument("--num-prompts", type=int, default={"throughput": 1000, "service": 64}.get(name, 1))
        p.add_argument("--batch-size", type=int, default=64 if name == "throughput" else 1,
                       help="latency: requests per batch; throughput: batch size of the HF baseline")
        p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
        add_engine_args(p)  # --model, --seed (also the workload's), --dtype, ... as EngineConfig has them
        if name != "service":
            p.add_argument("--compare-hf", action="store_true", help="also run transformers on the same requests")
        if name == "throughput":
            p.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens")
        elif name == "service":
            p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
        else:
            p.add_argument("--num-iters-warmup", type=int, default=1)
            p.add_argument("--num-iters", type=int, default=3)
    attention = sub.add_parser("attention", help="paged decode attention kernel: bandwidth vs copy bandwidth")
    attention.add_argument("--batch-size", type=int, default=64)
    attention.add_argument("--context-len", type=int, default=4096)
    attention.add_argument("--num-heads", type=int, default=32)
    attention.add_argument("--num-kv-heads", type=int, default=8)
    attention.add_argument("--head-dim", type=int, default=128)
    attention.add_argument("--block-size", type=int, default=16)
    attention.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    attention.add_argument("--iters", type=int, default=50)
    attention.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = "python -m engine.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.command == "attention":
        return _attention(args, command)
    options = asdict(engine_config_from_args(args))
    options["skip_tokenizer_init"] = True  # token-id workloads: no tokenizer needed (or shipped)
    if args.command == "service":
        return _service(args, options, command)
    from engine.llm import LLM  # heavy imports after --help

    llm = LLM(**options)
    engine = llm.llm_engine
    num_prompts = args.num_prompts if args.command == "throughput" else args.batch_size
    requests = make_workload(num_prompts, args.input_len, args.output_len, engine.vocab_size, args.seed)
    results = {"command": command, "model": args.model, "device": str(engine.runner.device),
               "dtype": str(engine.runner.dtype).replace("torch.", ""), "num_prompts": num_prompts,
               "input_len": str(args.input_len), "output_len": str(args.output_len)}
    device = engine.runner.device
    results["engine"] = _run(args, llm, requests, device)
    _print("engine", results["engine"])
    engine.shutdown()  # tensor-parallel workers leave the group now, not in interpreter teardown
    if args.compare_hf:
        from engine.bench.hf_baseline import load_hf_model

        source, dtype, eos_ids = engine.source, engine.runner.dtype, engine.eos_token_ids
        del llm, engine  # free the KV cache and weights: the baseline needs the memory
        _release_memory(device)
        model = load_hf_model(source, dtype, device)
        results["hf"] = _run(args, model, requests, device, hf=True, eos_ids=eos_ids)
        _print("transformers", results["hf"])
        ratio = results["engine"]["output_tokens_per_s"] / results["hf"]["output_tokens_per_s"]
        results["speedup_vs_hf"] = ratio
        print(f"speedup vs transformers: {ratio:.2f}x")
    _write_json(args.json, results)
    return 0


def _run(args, runner, requests, device, hf: bool = False, eos_ids: set[int] | None = None) -> dict:
    if args.command == "throughput":
        if hf:
            from engine.bench.hf_baseline import run_hf_throughput

            return run_hf_throughput(runner, requests, args.batch_size, eos_ids, args.ignore_eos, device)
        from engine.bench.throughput import run_engine_throughput

        return run_engine_throughput(runner, requests, args.ignore_eos, use_tqdm=sys.stderr.isatty())
    from engine.bench.latency import run_engine_latency, run_hf_latency

    if hf:
        return run_hf_latency(runner, requests, args.num_iters_warmup, args.num_iters, device)
    return run_engine_latency(runner, requests, args.num_iters_warmup, args.num_iters)


def _attention(args, command: str) -> int:
    import torch

    from engine.bench.attention import run_attention_bench

    results = {"command": command, **run_attention_bench(
        args.batch_size, args.context_len, args.num_heads, args.num_kv_heads, args.head_dim, args.block_size,
        getattr(torch, args.dtype), args.iters)}
    _print("paged decode attention", results)
    _write_json(args.json, results)
    return 0


def _service(args, options: dict, command: str) -> int:
    from engine.bench.service import run_service_comparison
    from engine.weights import load_model_config, resolve_model

    vocab_size = load_model_config(resolve_model(args.model)).vocab_size
    requests = make_workload(args.num_prompts, args.input_len, args.output_len, vocab_size, args.seed)
    results = {"command": command, **run_service_comparison(options, requests, args.redis_url)}
    _print("in-process LLM", results["in_process"])
    _print("through Redis", results["through_redis"])
    print(f"through Redis / in-process: {results['ratio']:.3f}")
    _write_json(args.json, results)
    return 0


def _write_json(path: str | None, results: dict) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(results, handle, indent=2)


def _release_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _print(name: str, result: dict) -> None:
    figures = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    print(f"{name}: {figures}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
