"""python -m engine.bench throughput|latency|service|serve|attention ...: vLLM-style benchmarks.

throughput and latency run both engines (with --compare-hf) in this one process on the same
requests, so the printed ratio is like for like; serve drives the HTTP API (see engine.bench.serve).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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
            p.add_argument("--structured-fraction", type=float, default=0.0, metavar="F",
                           help="this fraction of the requests (spread evenly) follows a JSON schema")
            p.add_argument("--structured-schema", default=None, metavar="JSON",
                           help="that schema (JSON text; default: engine/bench/throughput.py's BENCH_SCHEMA)")
        elif name == "service":
            p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
        else:
            p.add_argument("--num-iters-warmup", type=int, default=1)
            p.add_argument("--num-iters", type=int, default=3)
    _add_serve_parser(sub)
    speculative = sub.add_parser("speculative", help="n-gram or draft-model speculation vs plain decoding")
    speculative.add_argument("--batch-size", type=int, default=16)
    speculative.add_argument("--num-single", type=int, default=4, help="requests run one at a time (batch 1)")
    speculative.add_argument("--max-tokens", type=int, default=128)
    speculative.add_argument("--num-speculative-tokens", type=int, default=4)
    speculative.add_argument("--prompt-lookup-min", type=int, default=1)
    speculative.add_argument("--prompt-lookup-max", type=int, default=4)
    speculative.add_argument("--draft-model", action="append", metavar="MODEL",
                             help="run draft-model speculation with this draft instead of n-gram (repeatable: one "
                                  "run each, e.g. the target itself and a smaller model)")
    speculative.add_argument("--interleave", action="store_true",
                             help="build every engine first and let them take turns, request by request (for a "
                                  "shared CPU whose load drifts; on a GPU the engines would share its memory)")
    speculative.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    add_engine_args(speculative)
    lora = sub.add_parser("lora", help="throughput and batch 1 with random adapters vs the base model")
    lora.add_argument("--num-loras", type=int, default=8, help="distinct adapters, round-robin over the requests")
    lora.add_argument("--lora-rank", type=int, default=16)
    lora.add_argument("--num-prompts", type=int, default=1000)
    lora.add_argument("--input-len", type=LengthRange.parse, default=LengthRange.parse("256"))
    lora.add_argument("--output-len", type=LengthRange.parse, default=LengthRange.parse("256"))
    lora.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    add_engine_args(lora)
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


def _add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="streamed completions through the HTTP API (vLLM's bench serve)",
                           description="Streamed completions through the HTTP API, timed per token (vLLM's bench "
                                       "serve). Exits 1 if any stream failed or was cut.")
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="a running service, e.g. http://127.0.0.1:8000")
    where.add_argument("--launch", action="store_true",
                       help="start Redis (if none answers), the engine and the web tier here, then stop them")
    serve.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="with --base-url")
    serve.add_argument("--input-len", type=LengthRange.parse, default=LengthRange.parse("1024"), help="N or LOW-HIGH")
    serve.add_argument("--output-len", type=LengthRange.parse, default=LengthRange.parse("128"),
                       help="max_tokens (always generated: ignore_eos): N or LOW-HIGH")
    serve.add_argument("--num-prompts", type=int, default=1000)
    serve.add_argument("--request-rate", type=float, default=math.inf,
                       help="requests per second, Poisson arrivals (default inf: all at once)")
    serve.add_argument("--max-concurrency", type=int, help="requests in flight at most, over all client processes")
    serve.add_argument("--num-clients", type=int, default=min(8, len(os.sched_getaffinity(0))),
                       help="client processes (default: min(8, cores))")
    serve.add_argument("--vocab-size", type=int, help="prompt token ids are below it (default: the model's)")
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds to connect, or between two reads")
    serve.add_argument("--json", metavar="PATH", help="write the results, every request's included, as JSON here")
    launch = serve.add_argument_group("with --launch")
    launch.add_argument("--web-workers", type=int, default=1, help="daphne processes (several: project.supervisor)")
    launch.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                        help="used if it answers, else a private redis-server is started")
    launch.add_argument("--log-dir", help="keep the children's logs here (default: a temporary folder)")
    launch.add_argument("--compare-offline", action="store_true",
                        help="first run the throughput bench on the same requests, in a child process")
    launch.add_argument("--also-max-concurrency", type=int, metavar="N",
                        help="then the same requests again on the same stack, at most N in flight")
    launch.add_argument("--batch1-requests", type=int, metavar="K",
                        help="also K requests one at a time over HTTP vs the offline latency bench (ms/token)")
    add_engine_args(serve)  # --model and --seed (also the workload's); the others are the launched engine's


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = "python -m engine.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.command == "attention":
        return _attention(args, command)
    if args.command == "serve":
        return _serve(args, command)
    if args.command == "speculative":
        return _speculative(args, command)
    if args.command == "lora":
        return _lora(args, command)
    options = asdict(engine_config_from_args(args))
    # Token-id workloads need no tokenizer (none may be shipped), except to compile grammars.
    options["skip_tokenizer_init"] = not getattr(args, "structured_fraction", 0)
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
        model = load_hf_model(source, dtype, device, args.seed)
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

        return run_engine_throughput(runner, requests, args.ignore_eos, use_tqdm=sys.stderr.isatty(),
                                     structured_fraction=args.structured_fraction,
                                     structured_schema=args.structured_schema)
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
    from engine.bench.service import run_through_redis
    from engine.bench.stack import offline_throughput

    requests = make_workload(args.num_prompts, args.input_len, args.output_len, _vocab_size(args.model), args.seed)
    offline = offline_throughput(options, num_prompts=args.num_prompts, input_len=args.input_len,
                                 output_len=args.output_len)
    _print("offline LLM", offline)
    through_redis = run_through_redis(options, requests, args.redis_url)
    _print("through Redis", through_redis)
    ratio = through_redis["output_tokens_per_s"] / offline["output_tokens_per_s"]
    print(f"through Redis / offline: {ratio:.3f}")
    _write_json(args.json, {"command": command, "offline": offline, "through_redis": through_redis, "ratio": ratio})
    return 0


def _serve(args, command: str) -> int:
    from engine.bench.serve import Target

    if not (args.launch or args.api_key):
        raise SystemExit("--base-url needs --api-key (or OPENAI_API_KEY)")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # else a line per /health poll
    vocab_size = args.vocab_size or _vocab_size(args.model)
    requests = make_workload(args.num_prompts, args.input_len, args.output_len, vocab_size, args.seed)
    load = {"request_rate": args.request_rate, "max_concurrency": args.max_concurrency, "num_clients": args.num_clients,
            "seed": args.seed}
    results = {"command": command, "model": args.model, "num_prompts": args.num_prompts,
               "input_len": str(args.input_len), "output_len": str(args.output_len),
               "request_rate": args.request_rate, "max_concurrency": args.max_concurrency}
    if args.launch:
        results.update(_serve_launched(args, requests, vocab_size, load))
    else:
        results["http"] = _measure(Target(args.base_url, args.api_key, args.model, args.timeout), requests, **load)
    _write_json(args.json, results)
    runs = [results[name] for name in ("http", "http_capped", "http_batch1") if name in results]
    return 1 if any(run["failed"] or run["cut"] for run in runs) else 0


def _serve_launched(args, requests, vocab_size: int, load: dict) -> dict:
    """The offline runs first, each in a child process whose exit frees the GPU; then the stack."""
    from engine.bench.serve import Target
    from engine.bench.stack import LaunchedStack, offline_throughput, run_offline_bench

    options, results = asdict(engine_config_from_args(args)), {}
    if args.compare_offline:
        results["offline"] = offline_throughput(options, num_prompts=args.num_prompts, input_len=args.input_len,
                                                output_len=args.output_len)
    if args.batch1_requests:
        results["offline_batch1"] = run_offline_bench("latency", options, [
            "--batch-size", "1", "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--num-iters", str(args.batch1_requests)])["engine"]
    with LaunchedStack(options, web_workers=args.web_workers, redis_url=args.redis_url, log_dir=args.log_dir) as stack:
        target = Target(stack.base_url, stack.api_key, stack.model, args.timeout)
        results["http"] = _measure(target, requests, **load)
        if args.also_max_concurrency:
            results["http_capped"] = _measure(target, requests, **{**load, "max_concurrency": args.also_max_concurrency})
        if args.batch1_requests:
            one_by_one = make_workload(args.batch1_requests, args.input_len, args.output_len, vocab_size, args.seed)
            results["http_batch1"] = _measure(target, one_by_one, **{**load, "request_rate": math.inf,
                                                                     "max_concurrency": 1, "num_clients": 1})
    _print_comparisons(results)
    return results


def _measure(target, requests, **load) -> dict:
    from engine.bench.serve import format_report, run_load, summarize

    records, duration = run_load(target, requests, **load)
    summary = summarize(records, duration)
    print(format_report(summary), flush=True)
    return {**summary, "requests": [r.as_json() for r in records]}


def _print_comparisons(results: dict) -> None:
    if "offline" in results:
        offline = results["offline"]["output_tokens_per_s"]
        for name in ("http", "http_capped"):
            if name in results:
                print(f"output tok/s: {name} {results[name]['output_throughput']:.1f} / offline {offline:.1f} = "
                      f"{results[name]['output_throughput'] / offline:.3f}")
        offline_tpot = results["offline"].get("tpot_p50_ms")
        if offline_tpot and results.get("http", {}).get("p50_tpot_ms"):  # the same requests, all at once
            print(f"TPOT p50 (ms): http {results['http']['p50_tpot_ms']:.2f} / offline {offline_tpot:.2f} = "
                  f"{results['http']['p50_tpot_ms'] / offline_tpot:.3f}")
    if "http_batch1" in results and results["http_batch1"]["completed"]:
        batch1 = results["http_batch1"]
        http_ms = batch1["mean_e2el_ms"] * batch1["completed"] / max(1, batch1["total_output_tokens"])
        offline_ms = results["offline_batch1"]["ms_per_output_token"]
        print(f"batch 1, ms per output token: http {http_ms:.2f} / offline {offline_ms:.2f} = "
              f"{http_ms / offline_ms:.3f}")


def _vocab_size(model: str) -> int:
    """Token ids a served prompt may use: the model's vocabulary, a dummy model's borrowed tokenizer's
    where that is smaller (the service refuses ids beyond it). Imports transformers and torch, but
    starts no device."""
    from engine.tokenization import load_tokenizer, token_id_limit
    from engine.weights import load_model_config, resolve_model

    source = resolve_model(model)
    tokenizer = load_tokenizer(source) if source.kind == "dummy" else None
    return token_id_limit(source, load_model_config(source), tokenizer)


def _speculative(args, command: str) -> int:
    from engine.bench.speculative import run_speculative_bench

    options = asdict(engine_config_from_args(args))
    options.pop("speculative_config")
    k = args.num_speculative_tokens
    if args.draft_model:
        specs = {f"draft:{model}": {"model": model, "num_speculative_tokens": k} for model in args.draft_model}
    else:
        specs = {"ngram": {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": args.prompt_lookup_min,
                           "prompt_lookup_max": args.prompt_lookup_max}}
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"command": command, "speculative_configs": specs,
               **run_speculative_bench(options, specs, args.batch_size, args.num_single, args.max_tokens,
                                       release_memory=lambda: _release_memory(device), interleave=args.interleave)}
    _print("speculative", {k: v for k, v in results.items() if k != "command"})
    _write_json(args.json, results)
    # float32 (the CPU's default) must give identical greedy outputs; bfloat16 may round differently.
    exact = options["dtype"] in ("float32", "float", "fp32") or (options["dtype"] == "auto"
                                                                and not torch.cuda.is_available())
    return 0 if not exact or all(v for k, v in results.items() if k.startswith("identical_")) else 1


def _lora(args, command: str) -> int:
    import torch

    from engine.bench.lora import run_lora_bench

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    options = asdict(engine_config_from_args(args))
    options["skip_tokenizer_init"] = True
    for name in ("enable_lora", "max_loras", "max_lora_rank"):
        options.pop(name, None)
    results = {"command": command, **run_lora_bench(
        options, args.num_loras, args.lora_rank, args.num_prompts, args.input_len, args.output_len, args.seed,
        release_memory=lambda: _release_memory(device))}
    for name in ("base", "lora"):
        _print(f"{name} throughput", results[name]["throughput"])
        _print(f"{name} batch 1", results[name]["batch_1"])
    print(f"throughput with {args.num_loras} adapters / base: {results['throughput_ratio']:.3f}; "
          f"batch-1 speed with an adapter / base: {results['batch_1_speed_ratio']:.3f}")
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
