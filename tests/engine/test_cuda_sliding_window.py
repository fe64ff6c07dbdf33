"""The sliding-window Mistral on a GPU: the Triton kernels, CUDA graphs and async scheduling, with
blocks behind the window given back to a cache smaller than one request, against transformers."""

import pytest
import torch

from engine import LLM
from tests.engine.conftest import assert_greedy_matches_transformers, build_tiny_hf_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

WINDOW = 50  # blocks of 16: the window starts mid-block


@pytest.fixture(scope="module")
def sliding_mistral_on_cuda(tmp_path_factory):
    model = build_tiny_hf_model("mistral", sliding_window=WINDOW)
    path = tmp_path_factory.mktemp("tiny-mistral-sliding-cuda")
    model.save_pretrained(str(path))
    model.set_attn_implementation("eager")
    return path, model.to("cuda")


@pytest.mark.parametrize("enforce_eager, async_scheduling", [(False, True), (False, False), (True, True)],
                         ids=["cuda-graphs", "cuda-graphs-sync", "eager"])
def test_greedy_matches_transformers_on_cuda(sliding_mistral_on_cuda, enforce_eager, async_scheduling):
    """Four requests of up to 230 tokens through 13 blocks of 16 (208 slots): each holds at most
    9 blocks (its window's and a 64-token step's), so they are preempted and recomputed."""
    path, hf = sliding_mistral_on_cuda
    torch.backends.cuda.matmul.allow_tf32 = False
    llm = LLM(model=str(path), dtype="float32", device="cuda", skip_tokenizer_init=True, block_size=16,
              num_gpu_blocks_override=14, max_num_batched_tokens=64, enforce_eager=enforce_eager,
              async_scheduling=async_scheduling)
    assert llm.llm_engine.kv_cache_manager.sliding_windows == (WINDOW,)
    lengths = (5, 60, 130, 200)
    prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(length)] for i, length in enumerate(lengths)]
    assert_greedy_matches_transformers(llm, hf, prompts, [40, 30, 20, 30])
    assert llm.llm_engine.scheduler.num_preemptions > 0
