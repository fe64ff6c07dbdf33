"""Draft-model speculation on CUDA: the draft's decode steps replay its CUDA graphs, greedy tokens
are those of plain decoding (float32), and sampled requests run through the rejection sampler."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.conftest import TINY_VOCAB
from tests.engine.test_spec_decode import greedy_tokens
from tests.engine.test_spec_decode_draft import tiny_pair  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _count_calls(owner, name: str) -> list[int]:
    calls, method = [0], getattr(owner, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return method(*args, **kwargs)

    setattr(owner, name, counted)
    return calls


def test_the_drafts_decode_steps_replay_cuda_graphs_and_greedy_tokens_stay(tiny_pair):  # noqa: F811
    folder, _, draft_folder = tiny_pair
    generator = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(3, TINY_VOCAB, (length,), generator=generator).tolist()}
               for length in (5, 40, 17)]
    options = dict(model=str(folder), dtype="float32", device="cuda", block_size=16, max_num_seqs=8, seed=0,
                   num_gpu_blocks_override=64)
    expected = greedy_tokens(LLM(**options), prompts, max_tokens=32, ignore_eos=True)
    llm = LLM(**options, speculative_config={"model": str(draft_folder), "num_speculative_tokens": 4})
    drafter = llm.llm_engine.runner.drafter
    replays, eager = _count_calls(drafter.cuda_graphs, "replay"), _count_calls(drafter.model, "forward")
    assert greedy_tokens(llm, prompts, max_tokens=32, ignore_eos=True) == expected
    stats = llm.llm_engine.stats()
    assert stats["spec_num_accepted_tokens"] > 0, stats
    assert eager[0] <= 3 and replays[0] > 20, (eager, replays)  # eager only for the prompts' catch-ups


def test_sampled_requests_with_a_bf16_self_draft():
    """dummy:llama-3.2-1b drafting for itself in bfloat16: seeded sampled requests run, the same twice
    (no prefix cache: the second run computes what the first did)."""
    options = dict(model="dummy:llama-3.2-1b", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024,
                   max_num_seqs=8, num_gpu_blocks_override=256, enable_prefix_caching=False)
    llm = LLM(**options, speculative_config={"model": "dummy:llama-3.2-1b", "num_speculative_tokens": 3})
    prompts = [{"prompt_token_ids": [1000 + 17 * i + j for j in range(20)]} for i in range(4)]
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, ignore_eos=True, seed=i) for i in range(4)]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    second = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert first == second and all(len(tokens) == 24 for tokens in first)
    assert llm.llm_engine.stats()["spec_acceptance_rate"] > 0.5
