"""Llama-3.1-8B shape in bfloat16 on the GPU: prefill logits against transformers, same weights."""

import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PROMPT_LENGTHS = (17, 64, 200, 333)  # distinct: each prompt's logits are told apart by their row count


def test_prefill_logits_within_one_percent_of_transformers():
    from transformers import AutoModelForCausalLM

    from engine.weights.dummy import dummy_config, initialize_dummy_weights

    llm = LLM(model="dummy:llama-3.1-8b", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=2048,
              gpu_memory_utilization=0.45, enforce_eager=True)
    config = dummy_config("llama-3.1-8b")
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    initialize_dummy_weights(hf, seed=1)
    model = llm.llm_engine.runner.model
    model.load_weights(hf.state_dict().items())  # the same weights in both

    captured = {}  # rows -> logits of the prompt positions (prompt_logprobs makes the runner compute them)
    compute_logits = model.compute_logits

    def capture(hidden):
        logits = compute_logits(hidden)
        captured.setdefault(hidden.shape[0], logits.float())
        return logits

    model.compute_logits = capture
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    for prompt in prompts:
        with torch.no_grad():
            reference = hf(torch.tensor([prompt], device="cuda")).logits[0, :-1].float()
        assert reference.std() > 0.1, "logits too flat for a meaningful comparison"
        ours = captured[len(prompt) - 1]
        relative_error = ((ours - reference).norm() / reference.norm()).item()
        assert relative_error < 1e-2, f"prompt of {len(prompt)} tokens: relative error {relative_error:.4f}"
