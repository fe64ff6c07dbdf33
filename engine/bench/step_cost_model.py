"""python -m engine.bench.step_cost_model: the real scheduler replayed on a throughput workload, each
step priced by a roofline model of a dense decoder on one card. A planning tool, not a measurement.

    python -m engine.bench.step_cost_model --input-len 16-1024 --output-len 16-512 [--sweep-tflops 650 700]

A step with async scheduling costs what its device work costs:
    fixed + max(weight bytes / bandwidth, FLOPs of the step's tokens / linear TFLOP/s)
          + decode KV bytes read / KV bandwidth + prefill attention FLOPs / attention TFLOP/s
(the LM head's FLOPs count for the rows that sample only). The defaults are Llama 3.1 8B in bf16 on
an H200, each constant measured on the card at 4440d05 by whole-run profiles (`engine.bench.step_profile
... --profile-from 0 --window 0`, benchmarks/RESULTS.md): the GEMMs at 677-696 TFLOP/s, the decode
kernel reading the KV cache at ~3.8 TB/s, ~2.9 ms a step of norms, rotary, SiLU and sampling. With
them the model gives 1000 x 256/256 in 15.02 s of device time (profiled: 14.98 s busy, 15.42 s wall)
and 16-1024 in / 16-512 out in 24.95 s (24.60 s busy, 26.35 s wall); its linear and decode attention parts
are within 4% of the profiles'. It prints the time by part, and TTFT and TPOT p50 in model
time. (An earlier fit to two run times alone, linear at 580 TFLOP/s, gave the right totals with the
wrong split.)
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass, field, replace

from engine.bench.workload import LengthRange, make_workload
from engine.config import SchedulerConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.scheduler import Scheduler
from engine.request import Request
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class DeviceModel:
    """Defaults measured on the H200 at 4440d05 (whole-run profiles, `step_profile --window 0`)."""

    linear_tflops: float = 690.0  # the GEMMs in the runs: 677-696 (one short burst of one GEMM: ~796)
    bandwidth_tbs: float = 4.3  # HBM, for the weights
    attention_tflops: float = 140.0  # prefill attention (0.69 s in the mixed run)
    fixed_ms: float = 2.9  # per step: norms, rotary, SiLU, sampling ("other" in the profile)
    kv_bandwidth_tbs: float = 3.8  # the decode attention kernel's read of the KV cache


@dataclass(frozen=True)
class DecoderShape:
    """What the roofline needs of a dense decoder (defaults: Llama 3.1 8B in bf16)."""

    linear_params: float = 6.98e9  # the decoder's projections
    lm_head_params: float = 0.525e9
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2

    @property
    def weight_bytes(self) -> float:
        return (self.linear_params + self.lm_head_params) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * self.dtype_bytes

    @property
    def attention_flops_per_pair(self) -> int:
        """One query attending to one key: QK and PV, 2 FLOPs a multiply-add, every head and layer."""
        return 2 * 2 * self.head_dim * self.num_heads * self.num_layers


@dataclass
class Prediction:
    seconds: float = 0.0
    num_steps: int = 0
    output_tokens: int = 0
    # Per request, in model seconds: its first token's time and its time per output token after it.
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("linear, compute-bound", "linear, weight-read-bound", "decode attention (KV reads)", "prefill attention",
         "fixed"), 0.0))

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


def price_step(prediction: Prediction, shape: DecoderShape, device: DeviceModel, num_tokens: int, num_sampled: int,
               decode_context: int, prefill_pairs: int) -> None:
    """Add one step's device time, by part, to `prediction`."""
    flops = 2 * shape.linear_params * num_tokens + 2 * shape.lm_head_params * num_sampled
    compute = flops / (device.linear_tflops * 1e12)
    weights = shape.weight_bytes / (device.bandwidth_tbs * 1e12)
    parts = prediction.parts
    parts["linear, compute-bound" if compute > weights else "linear, weight-read-bound"] += max(compute, weights)
    parts["decode attention (KV reads)"] += decode_context * shape.kv_bytes_per_token / (device.kv_bandwidth_tbs * 1e12)
    parts["prefill attention"] += prefill_pairs * shape.attention_flops_per_pair / (device.attention_tflops * 1e12)
    parts["fixed"] += device.fixed_ms / 1000
    prediction.seconds = sum(parts.values())
    prediction.num_steps += 1


def predict(config: SchedulerConfig, num_kv_tokens: int, requests, shape: DecoderShape = DecoderShape(),
            device: DeviceModel = DeviceModel(), block_size: int = 16) -> Prediction:
    """Run `requests` (BenchRequest, ignore_eos) through the real scheduler with every sampled token
    known at once; price each step."""
    scheduler = Scheduler(config, KVCacheManager(num_kv_tokens // block_size, block_size, enable_caching=False))
    for i, bench_request in enumerate(requests):
        params = SamplingParams(max_tokens=bench_request.max_tokens, ignore_eos=True)
        params.all_stop_token_ids = set()
        scheduler.add_request(Request(f"r{i}", bench_request.prompt_token_ids, params, arrival_time=float(i)))
    prediction = Prediction()
    first_token_at: dict[str, float] = {}
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        decode_context = prefill_pairs = 0
        for request_id, num_new in output.num_scheduled_tokens.items():
            end = scheduler.requests[request_id].num_computed_tokens  # advanced by schedule(): past this step
            if num_new == 1 and scheduler.requests[request_id].num_output_tokens:
                decode_context += end
            else:  # a prefill chunk: each query sees the context before it and the chunk up to itself
                prefill_pairs += num_new * (end - num_new) + num_new * (num_new + 1) // 2
        price_step(prediction, shape, device, output.total_num_scheduled_tokens, len(output.sampling_req_ids),
                   decode_context, prefill_pairs)
        prediction.output_tokens += len(output.sampling_req_ids)
        for request_id in output.sampling_req_ids:
            first_token_at.setdefault(request_id, prediction.seconds)
        for request in scheduler.update(output, dict.fromkeys(output.sampling_req_ids, 1000)):
            first = first_token_at.pop(request.request_id)
            prediction.ttft.append(first)
            if request.num_output_tokens > 1:
                prediction.tpot.append((prediction.seconds - first) / (request.num_output_tokens - 1))
    return prediction


def decode_step_seconds(num_seqs: int, context: int, shape: DecoderShape = DecoderShape(),
                        device: DeviceModel = DeviceModel()) -> float:
    """The model's price of a pure decode step: `num_seqs` sequences, each `context` tokens long."""
    prediction = Prediction()
    price_step(prediction, shape, device, num_seqs, num_seqs, num_seqs * context, 0)
    return prediction.seconds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.step_cost_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=LengthRange.parse, default=LengthRange.parse("256"))
    parser.add_argument("--output-len", type=LengthRange.parse, default=LengthRange.parse("256"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--long-prefill-token-threshold", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--num-kv-tokens", type=int, default=878_000, help="the KV cache (an H200 at 8B: ~878k)")
    for name, default in asdict(DeviceModel()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=default)
    parser.add_argument("--sweep-tflops", type=float, nargs="*", default=[],
                        help="also predict with these linear TFLOP/s")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    batched = args.max_num_batched_tokens
    threshold = args.long_prefill_token_threshold or max(16, batched // 4)
    config = SchedulerConfig(args.max_model_len, args.max_num_seqs, batched, min(threshold, batched))
    requests = make_workload(args.num_prompts, args.input_len, args.output_len, 128256, args.seed)
    device = DeviceModel(*(getattr(args, name) for name in asdict(DeviceModel())))
    results = []
    for tflops in [device.linear_tflops, *args.sweep_tflops]:
        model = replace(device, linear_tflops=tflops)
        prediction = predict(config, args.num_kv_tokens, requests, device=model)
        row = {"device": asdict(model), "seconds": round(prediction.seconds, 3), "steps": prediction.num_steps,
               "output_tokens_per_s": round(prediction.output_tokens_per_s),
               "parts_s": {k: round(v, 3) for k, v in prediction.parts.items()},
               "ttft_p50_s": round(statistics.median(prediction.ttft), 3),
               "tpot_p50_ms": round(1000 * statistics.median(prediction.tpot), 2) if prediction.tpot else None}
        print(json.dumps(row))
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
