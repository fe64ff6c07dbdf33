"""The roofline replay of engine.bench.step_cost_model and the profile summary of engine.bench.kernel_kinds:
pure functions over the real scheduler, no model."""

from __future__ import annotations

import pytest

from engine.bench.kernel_kinds import KernelTime, by_kind, kind_of, summary_lines
from engine.bench.step_cost_model import DecoderShape, DeviceModel, decode_step_seconds, predict
from engine.bench.workload import LengthRange, make_workload
from engine.config import SchedulerConfig

CONFIG = SchedulerConfig(max_model_len=4096, max_num_seqs=64, max_num_batched_tokens=2048,
                         long_prefill_token_threshold=512)


def workload(output_len: str = "8-32"):
    return make_workload(40, LengthRange.parse("16-600"), LengthRange.parse(output_len), 128256, seed=1)


def test_every_requested_token_is_generated_and_every_second_is_in_a_part():
    requests = workload()
    prediction = predict(CONFIG, 200_000, requests)
    assert prediction.output_tokens == sum(r.max_tokens for r in requests)
    assert prediction.seconds == pytest.approx(sum(prediction.parts.values()))
    assert prediction.parts["fixed"] == pytest.approx(prediction.num_steps * DeviceModel().fixed_ms / 1000)
    # At most 2048 tokens a step: at least the prompt tokens over the budget, plus the decode tail.
    assert prediction.num_steps >= sum(len(r.prompt_token_ids) for r in requests) / 2048 + 31


def test_faster_linear_layers_and_more_bandwidth_shorten_the_run():
    requests = workload()
    base = predict(CONFIG, 200_000, requests).seconds
    assert predict(CONFIG, 200_000, requests, device=DeviceModel(linear_tflops=800.0)).seconds < base
    assert predict(CONFIG, 200_000, requests, device=DeviceModel(bandwidth_tbs=8.0)).seconds < base


def test_decode_attention_is_priced_at_the_kv_read_bandwidth_alone():
    requests = workload()
    base = predict(CONFIG, 200_000, requests)
    faster = predict(CONFIG, 200_000, requests, device=DeviceModel(kv_bandwidth_tbs=2 * DeviceModel().kv_bandwidth_tbs))
    assert faster.parts["decode attention (KV reads)"] == pytest.approx(base.parts["decode attention (KV reads)"] / 2)
    assert {k: v for k, v in faster.parts.items() if k != "decode attention (KV reads)"} == pytest.approx(
        {k: v for k, v in base.parts.items() if k != "decode attention (KV reads)"})


def test_a_one_token_step_reads_every_weight_once():
    """A single sequence is weight-read bound: each step (its 16-token prefill too) costs the weights
    over the bandwidth."""
    requests = make_workload(1, LengthRange.parse("16"), LengthRange.parse("33"), 128256, seed=0)
    prediction = predict(CONFIG, 200_000, requests)
    read_bound = prediction.parts["linear, weight-read-bound"]
    assert prediction.num_steps == 33  # the prefill samples the first token
    assert read_bound == pytest.approx(33 * DecoderShape().weight_bytes / (DeviceModel().bandwidth_tbs * 1e12))
    [ttft], [tpot] = prediction.ttft, prediction.tpot
    assert tpot == pytest.approx((prediction.seconds - ttft) / 32)
    assert decode_step_seconds(1, 17) < tpot < decode_step_seconds(1, 48)  # its context grows from 17 to 48


def test_a_burst_prefilled_in_one_step_decodes_at_the_pure_decode_step():
    """All prompts in one step, then every request decodes together: time per output token is the
    decode step's price and the run costs no more than the chunked schedule; first tokens wait."""
    import statistics

    requests = make_workload(64, LengthRange.parse("32"), LengthRange.parse("16"), 128256, seed=0)
    chunked = predict(SchedulerConfig(4096, 64, max_num_batched_tokens=256, long_prefill_token_threshold=64),
                      200_000, requests)
    at_once = predict(SchedulerConfig(4096, 64, max_num_batched_tokens=2048, long_prefill_token_threshold=2048),
                      200_000, requests)
    assert at_once.num_steps == 16 < chunked.num_steps
    assert statistics.median(at_once.tpot) == pytest.approx(decode_step_seconds(64, 40))  # contexts 33..47
    assert statistics.median(at_once.tpot) < statistics.median(chunked.tpot)
    assert statistics.median(at_once.ttft) > statistics.median(chunked.ttft)
    assert at_once.seconds <= chunked.seconds  # chunks add steps; each reads every weight


def test_kernel_names_sort_into_linear_attention_and_the_rest():
    assert kind_of("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTT") == "linear"
    assert kind_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "linear"
    assert kind_of("_gemv_kernel") == "linear"
    assert kind_of("mkldnn::_linear_pointwise") == "linear"
    assert kind_of("_paged_decode_kernel") == "attention"
    assert kind_of("_prefill_kernel") == "attention"
    assert kind_of("_fused_add_rms_norm_kernel") == "other"
    totals = by_kind([KernelTime("nvjet_a", 2.0), KernelTime("_paged_decode_kernel", 1.0), KernelTime("_argmax", 1.0)])
    assert totals == {"linear": 2.0, "attention": 1.0, "other": 1.0}
    lines = summary_lines([KernelTime("nvjet_a", 2.0), KernelTime("_rms", 2.0)], num_steps=4, linear_flops=1.2e15)
    assert "600.00 TFLOP/s achieved" in lines[1] and "50.0%" in lines[1]


def test_layer_ops_times_every_op_of_a_layer_at_each_token_count(tmp_path):
    """A smoke run on the CPU (eager; the figures come from the card): every op at every token count,
    with the rate the op is judged by, in the JSON file."""
    import json

    from engine.bench.layer_ops import main

    assert main(["--tokens", "2", "3", "--dtype", "float32", "--iters", "1", "--json", str(tmp_path / "ops.json")]) == 0
    rows = json.loads((tmp_path / "ops.json").read_text())["results"]
    assert [(row["op"], row["tokens"]) for row in rows] == [
        (op, tokens) for tokens in (2, 3) for op in ("qkv", "o", "gate_up", "down", "silu_and_mul", "add_rms_norm")]
    assert all(row["us"] > 0 and (row.get("tflops") or row.get("tb_per_s")) > 0 for row in rows)


def test_layer_ops_also_times_the_projections_in_row_chunks_above_the_chunk_size(tmp_path):
    import json

    from engine.bench.layer_ops import main

    assert main(["--tokens", "2", "3", "--chunk-tokens", "2", "--dtype", "float32", "--iters", "1",
                 "--json", str(tmp_path / "ops.json")]) == 0
    ops = [(row["op"], row["tokens"]) for row in json.loads((tmp_path / "ops.json").read_text())["results"]]
    assert [op for op in ops if "/" in op[0]] == [(f"{op}/2", 3) for op in ("qkv", "o", "gate_up", "down")]
