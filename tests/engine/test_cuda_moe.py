"""Mixture-of-experts models on a GPU: the fused MoE kernel inside the engine's CUDA graphs against
transformers, and the real presets' memory budgeting and graph capture."""

import gc

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.conftest import assert_greedy_matches_transformers, build_tiny_hf_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_greedy_matches_transformers_on_cuda(tmp_path, variant, enforce_eager):
    """float32, so the kernel's sums may differ from transformers' only in rounding; decode batches
    shrink from 4 to 1 as requests finish (replays of padded graphs)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    hf = build_tiny_hf_model(variant)
    hf.save_pretrained(str(tmp_path))
    hf = hf.to("cuda")
    llm = LLM(model=str(tmp_path), dtype="float32", device="cuda", skip_tokenizer_init=True, block_size=16,
              num_gpu_blocks_override=128, enforce_eager=enforce_eager)
    prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(length)] for i, length in enumerate((5, 40, 130, 1))]
    assert_greedy_matches_transformers(llm, hf, prompts, [12, 3, 9, 1])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_real_presets_budget_their_kv_cache_and_capture_graphs(preset):
    """61 GB and 93 GB of bf16 weights: the KV cache takes what gpu_memory_utilization leaves after the
    weights and a full-budget profile step, and decode runs from captured graphs."""
    _release_cuda_memory()  # an earlier test's engine (the other preset's 61 GB) must not count against this one
    total = torch.cuda.mem_get_info()[1]
    llm = LLM(model=f"dummy:{preset}", dtype="bfloat16", skip_tokenizer_init=True, gpu_memory_utilization=0.9,
              max_model_len=4096, max_num_seqs=64)
    try:
        runner = llm.llm_engine.runner
        assert runner.cuda_graphs is not None and runner.num_blocks * runner.block_size >= 4096
        assert torch.cuda.memory_allocated() <= 0.9 * total
        outputs = llm.generate([{"prompt_token_ids": list(range(100, 100 + n))} for n in (7, 300, 2000)],
                               SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outputs] == [16, 16, 16]
    finally:
        llm.llm_engine.shutdown()
        runner = llm = None  # the model and its KV cache go with the last references
        _release_cuda_memory()


def _release_cuda_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
