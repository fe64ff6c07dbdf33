"""The fused MoE Triton kernel (token sorting + two grouped GEMMs) against its torch reference, and the
reference against a per-token loop.

Poison: NaN in the weights of experts that no token chose (never to be read) and in the output
buffer (every element must be written); routing that leaves some experts without tokens and piles
most pairs onto one, token counts that are not multiples of the row tile, top-k 1, 2 and 8.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.layers import fused_moe as fused_moe_layer
from kernels import triton_or_reference
from kernels.fused_moe import MoELaunch, fused_moe, moe_launch_for
from kernels.fused_moe_ref import fused_moe_ref
from kernels.moe_align_block_size import max_padded_pairs, moe_align_block_size
from tests.kernels.kernel_testing import DEVICE, DTYPES, assert_matches, gpu_only, randn

SMALL_TILES = MoELaunch(block_m=16, block_n=32, block_k=32, group_m=2)


def skewed_routing(num_tokens: int, num_experts: int, top_k: int, idle: tuple[int, ...] = (), seed: int = 0):
    """(weights float32, ids) `[T, top_k]` from random router logits: the `idle` experts never chosen,
    expert 0 favoured (most tokens pick it), the rest spread unevenly."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator) * 2
    logits[:, 0] += 2.0
    logits[:, list(idle)] = float("-inf")
    weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).to(DEVICE), ids.to(DEVICE)


def moe_case(num_tokens, hidden, intermediate, num_experts, top_k, dtype, idle=(), seed=0):
    x = randn(num_tokens, hidden, dtype=dtype, seed=seed)
    w13 = randn(num_experts, 2 * intermediate, hidden, dtype=dtype, seed=seed + 1) / hidden ** 0.5
    w2 = randn(num_experts, hidden, intermediate, dtype=dtype, seed=seed + 2) / intermediate ** 0.5
    weights, ids = skewed_routing(num_tokens, num_experts, top_k, idle, seed)
    unused = [e for e in range(num_experts) if not (ids == e).any()]
    w13[unused] = float("nan")
    w2[unused] = float("nan")
    return x, w13, w2, weights, ids


def check(num_tokens, hidden, intermediate, num_experts, top_k, dtype, idle=(), launch=None, seed=0):
    x, w13, w2, weights, ids = moe_case(num_tokens, hidden, intermediate, num_experts, top_k, dtype, idle, seed)
    out = torch.full_like(x, float("nan"))
    assert fused_moe(x, w13, w2, weights, ids, out=out, launch=launch) is out
    assert_matches(out, fused_moe_ref(x, w13, w2, weights, ids), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, hidden, intermediate, num_experts, top_k, idle", [
    (1, 32, 48, 4, 1, ()),                    # decode, top-1
    (1, 64, 32, 8, 2, ()),                    # Mixtral-like decode
    (5, 48, 40, 6, 2, (3,)),                  # odd sizes; one expert idle
    (37, 64, 40, 8, 2, (2, 5)),               # 74 pairs: tiles of 16 with padding; two experts idle
    (19, 32, 24, 16, 8, (1, 7, 9)),           # Qwen3-MoE-like top-8 over 16 experts
])
def test_matches_reference(dtype, num_tokens, hidden, intermediate, num_experts, top_k, idle):
    check(num_tokens, hidden, intermediate, num_experts, top_k, dtype, idle, launch=SMALL_TILES)


@pytest.mark.parametrize("launch", [
    MoELaunch(block_m=16, block_n=16, block_k=16, group_m=1),
    MoELaunch(block_m=32, block_n=64, block_k=32, group_m=4),  # tiles wider than the outputs
    None,                                                      # the default for the size
], ids=["tiny-tiles", "wide-tiles", "default"])
def test_tile_shapes_agree(launch):
    check(70, 48, 40, 8, 2, torch.float32, idle=(6,), launch=launch, seed=3)


def test_all_pairs_on_one_expert():
    """Top-1 with every token on expert 0: one long group, the other experts idle (NaN weights)."""
    check(50, 32, 32, 4, 1, torch.float32, idle=(1, 2, 3), launch=SMALL_TILES, seed=5)


@pytest.mark.parametrize("num_tokens, num_experts, top_k, block_size", [
    (1, 8, 2, 16), (37, 8, 2, 16), (19, 16, 8, 16), (300, 128, 8, 64), (2000, 8, 2, 32), (600, 128, 8, 16),
])
def test_alignment_groups_every_pair_once_by_expert(num_tokens, num_experts, top_k, block_size):
    """Each pair exactly once, in its expert's group, token order kept; groups padded to whole tiles
    of one expert. Several chunks (2000 x 2 pairs over 8 experts; 600 x 8 over 128, more chunks and
    tiles than the offsets program handles at once) cross the chunk boundaries."""
    _, ids = skewed_routing(num_tokens, num_experts, top_k, idle=(1,), seed=num_tokens)
    alignment = moe_align_block_size(ids.to(torch.int32), num_experts, block_size)
    num_pairs = ids.numel()
    used = int(alignment.num_padded.item())
    counts = torch.bincount(ids.flatten().cpu(), minlength=num_experts)
    assert used == int(sum(-(-c // block_size) * block_size for c in counts.tolist()))
    assert used <= alignment.sorted_ids.numel() == max_padded_pairs(num_pairs, num_experts, block_size)
    sorted_ids = alignment.sorted_ids[:used].cpu()
    tile_experts = alignment.expert_ids[:used // block_size].cpu().repeat_interleave(block_size)
    real = sorted_ids < num_pairs
    assert torch.equal(sorted_ids[~real], torch.full_like(sorted_ids[~real], num_pairs))
    assert torch.equal(torch.sort(sorted_ids[real]).values, torch.arange(num_pairs, dtype=torch.int32))
    assert torch.equal(ids.flatten().cpu()[sorted_ids[real].long()], tile_experts[real])
    for expert in range(num_experts):
        group = sorted_ids[real & (tile_experts == expert)]
        assert torch.equal(group, torch.sort(group).values)


def test_launch_grows_with_the_pairs_per_expert():
    assert moe_launch_for(2, 8).block_m == 16
    assert moe_launch_for(8192, 8).block_m == 64
    assert moe_launch_for(4096 * 8, 128).block_m == 64


def test_a_moe_model_on_the_kernel_matches_the_reference(tmp_path, monkeypatch):
    """The tiny Qwen3-MoE checkpoint (top-4 of 16 experts on two of its four layers) with its expert
    layers on the interpreted kernel gives the log-probabilities of the torch path: prefill and decode."""
    from tests.engine.conftest import build_tiny_hf_model

    build_tiny_hf_model("qwen3-moe").save_pretrained(str(tmp_path))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=3)
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 250 + 3 for j in range(n)]} for i, n in enumerate((3, 21))]

    def logprobs():
        llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", skip_tokenizer_init=True, block_size=16,
                  num_gpu_blocks_override=16, max_num_batched_tokens=32)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [lp.logprob for output in outputs
                for position in output.prompt_logprobs[1:] + output.outputs[0].logprobs for lp in position.values()]

    expected = logprobs()
    on_cuda = SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(fused_moe_layer, "triton_or_reference",
                        lambda tensor, kernel, reference: triton_or_reference(on_cuda, kernel, reference))
    assert logprobs() == pytest.approx(expected, abs=1e-4)


def test_reference_is_a_per_token_sum_over_its_experts():
    x, w13, w2, weights, ids = moe_case(7, 16, 12, 4, 2, torch.float32, seed=9)
    w13, w2 = torch.nan_to_num(w13), torch.nan_to_num(w2)
    out = fused_moe_ref(x, w13, w2, weights, ids)
    for t in range(7):
        expected = torch.zeros(16, device=DEVICE)
        for k in range(2):
            e = int(ids[t, k])
            gate, up = w13[e, :12] @ x[t], w13[e, 12:] @ x[t]
            expected += weights[t, k] * (w2[e] @ (F.silu(gate) * up))
        torch.testing.assert_close(out[t], expected)


def test_the_benchmark_runs_on_the_presets_expert_shapes():
    """Its shapes come from the dummy presets; its measurement runs (interpreted here, on a tiny shape)."""
    from engine.bench.fused_moe import expert_shape, format_table, run_fused_moe_bench

    assert expert_shape("mixtral-8x7b") == (4096, 14336, 8, 2)
    assert expert_shape("qwen3-30b-a3b") == (2048, 768, 128, 8)
    row = run_fused_moe_bench(32, 32, 4, 2, num_tokens=5, dtype=torch.float32, iters=1)
    assert row["max_abs_error_vs_float32_reference"] < 1e-4 and row["fused_eager_ms"] > 0
    assert "fused MoE vs torch reference" in format_table("tiny", [row])


@gpu_only
@pytest.mark.parametrize("num_tokens", [1, 16, 64, 256, 4096])
@pytest.mark.parametrize("shape", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_bfloat16_real_shapes_on_gpu(num_tokens, shape):
    """(hidden, expert intermediate, experts, top_k) of the two presets; no idle-expert poison here."""
    hidden, intermediate, num_experts, top_k = {"mixtral-8x7b": (4096, 14336, 8, 2),
                                                "qwen3-30b-a3b": (2048, 768, 128, 8)}[shape]
    x, w13, w2, weights, ids = moe_case(num_tokens, hidden, intermediate, num_experts, top_k, torch.bfloat16)
    w13, w2 = torch.nan_to_num(w13), torch.nan_to_num(w2)
    expected = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids).float(), expected, atol=2e-2, rtol=2e-2)


@gpu_only
def test_replays_in_a_cuda_graph_with_new_routing():
    """Captured once, replayed after the routing changed in place: no host sync, no stale sizes."""
    x, w13, w2, weights, ids = moe_case(8, 256, 128, 8, 2, torch.bfloat16)
    w13, w2 = torch.nan_to_num(w13), torch.nan_to_num(w2)
    fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    new_weights, new_ids = skewed_routing(8, 8, 2, idle=(0,), seed=11)
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(out, fused_moe_ref(x, w13, w2, weights, ids), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_slots, top_k", [([1], 2), ([0, -1, 1, 1, -1, 0, 1], 2), ([-1, -1, -1], 1)])
def test_lora_on_the_experts_matches_the_reference(dtype, token_slots, top_k):
    """Each (token, k) pair of a token with an adapter gets its (adapter, expert) slot's LoRA on gate/up
    and down; pairs without one are the plain kernel's rows. Slots of (adapter, expert) no pair uses
    hold NaN."""
    from kernels.fused_moe_ref import MoELoRA
    from tests.kernels.test_lora_mapping import filled_mapping

    num_tokens, hidden, intermediate, num_experts, rank, num_adapters = len(token_slots), 32, 24, 4, 8, 2
    x, w13, w2, weights, ids = moe_case(num_tokens, hidden, intermediate, num_experts, top_k, dtype)
    slots = torch.tensor(token_slots, device=DEVICE)[:, None]
    pair_slots = torch.where(slots < 0, -1, slots * num_experts + ids).view(-1).tolist()
    count = num_adapters * num_experts
    lora = MoELoRA(filled_mapping(pair_slots, count), randn(count, rank, hidden, dtype=dtype, seed=7) / hidden ** 0.5,
                   randn(count, 2 * intermediate, rank, dtype=dtype, seed=8) / rank ** 0.5,
                   randn(count, rank, intermediate, dtype=dtype, seed=9) / intermediate ** 0.5,
                   randn(count, hidden, rank, dtype=dtype, seed=10) / rank ** 0.5)
    unused = [s for s in range(count) if s not in pair_slots]
    for buffer in (lora.a13, lora.b13, lora.a2, lora.b2):
        buffer[unused] = float("nan")
    out = fused_moe(x, w13, w2, weights, ids, lora=lora)
    assert_matches(out, fused_moe_ref(x, w13, w2, weights, ids, lora=lora), dtype)
    plain = fused_moe(x, w13, w2, weights, ids)
    no_adapter = torch.tensor(token_slots, device=DEVICE) < 0
    assert torch.equal(out[no_adapter], plain[no_adapter])
    if not no_adapter.all():
        assert not torch.allclose(out[~no_adapter].float(), plain[~no_adapter].float())
