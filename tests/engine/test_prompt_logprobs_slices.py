"""Prompt logprobs over a long prompt are computed a few positions at a time (issue 15, finding 13:
full-vocabulary logits for a whole 8192-token chunk could run the device out of memory). With
max_num_seqs=3 a 90-token prompt in one chunk is scored in 30 slices; every position must still
equal transformers' float32 log-softmax of the same weights."""

from __future__ import annotations

import torch

from engine import LLM, SamplingParams
from tests.engine.conftest import hf_log_softmax, load_bundled_hf_model

PROMPT = ("The harbour town woke slowly on winter mornings. Fishermen mended nets under yellow lamps, the "
          "baker pulled the first loaves from a brick oven, and children walked to school along the sea "
          "wall with their collars turned up against the wind. By noon the fog had usually lifted.")


def test_prompt_logprobs_in_slices_equal_transformers():
    llm = LLM(dtype="float32", max_num_seqs=3, num_gpu_blocks_override=64)
    ids = llm.get_tokenizer().encode(PROMPT, add_special_tokens=True)
    assert len(ids) > 10 * 3
    [output] = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=0, prompt_logprobs=2),
                            use_tqdm=False)
    reference = hf_log_softmax(load_bundled_hf_model(), ids)
    assert len(output.prompt_logprobs) == len(ids) and output.prompt_logprobs[0] is None
    ours = torch.tensor([entry[token].logprob for token, entry in zip(ids[1:], output.prompt_logprobs[1:])])
    torch.testing.assert_close(ours, reference[torch.arange(len(ids) - 1), ids[1:]], atol=1e-3, rtol=0)
    top = [max(entry.values(), key=lambda lp: lp.logprob) for entry in output.prompt_logprobs[1:]]
    assert all(lp.rank == 1 for lp in top)
