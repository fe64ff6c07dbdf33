"""The tiny sliding-window Mistral of tests/engine/test_sliding_window.py with its layers wired to the
Triton decode and prefill kernels (interpreted on the CPU), in a KV cache small enough that blocks
behind the window go back to the pool and are reused under preemption: transformers' tokens."""

import pytest
import torch

from tests.engine.conftest import assert_greedy_matches_transformers
from tests.engine.test_sliding_window import SMALL_CACHE, make_llm, prompts, sliding_mistral  # noqa: F401
from tests.kernels.test_layers_on_triton import use_triton_everywhere


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs tests/engine/test_cuda_sliding_window.py")
def test_the_triton_kernels_serve_a_sliding_window(sliding_mistral, monkeypatch):  # noqa: F811
    folder, hf_model = sliding_mistral
    use_triton_everywhere(monkeypatch)
    llm = make_llm(folder, **SMALL_CACHE)
    assert_greedy_matches_transformers(llm, hf_model, prompts(), [12, 10, 12])
    assert llm.llm_engine.scheduler.num_preemptions > 0
