"""Gemma 2 and 3 on a GPU: the Triton kernels at Gemma's real head size (256) with its sliding
windows and (Gemma 2) attention soft-cap, CUDA graphs and async scheduling, against transformers."""

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.conftest import build_tiny_hf_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

WINDOW = 40  # blocks of 16: the window starts mid-block


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gemma_on_cuda(request, tmp_path_factory):
    model = build_tiny_hf_model(request.param, head_dim=256, query_pre_attn_scalar=256, sliding_window=WINDOW,
                                max_position_embeddings=512)
    path = tmp_path_factory.mktemp(f"tiny-{request.param}-cuda")
    model.save_pretrained(str(path))
    model.set_attn_implementation("eager")
    return path, model.to("cuda")


@pytest.mark.parametrize("enforce_eager, async_scheduling", [(False, True), (False, False), (True, True)],
                         ids=["cuda-graphs", "cuda-graphs-sync", "eager"])
def test_greedy_and_logprobs_match_transformers_on_cuda(gemma_on_cuda, enforce_eager, async_scheduling):
    path, hf = gemma_on_cuda
    torch.backends.cuda.matmul.allow_tf32 = False
    llm = LLM(model=str(path), dtype="float32", device="cuda", skip_tokenizer_init=True, block_size=16,
              num_gpu_blocks_override=128, max_num_batched_tokens=64, enforce_eager=enforce_eager,
              async_scheduling=async_scheduling)
    lengths, max_tokens = (5, 60, 130, 300), (40, 30, 20, 12)
    prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(length)] for i, length in enumerate(lengths)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0) for n in max_tokens]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, n, output in zip(prompts, max_tokens, outputs):
        ids = torch.tensor([prompt], device="cuda")
        generated = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0]
        assert output.outputs[0].token_ids == generated[len(prompt):].tolist()
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(generated[None, :-1]).logits[0, len(prompt) - 1:].float(), dim=-1)
        expected = logprobs.gather(1, generated[len(prompt):, None])[:, 0].tolist()
        ours = [entry[token].logprob for entry, token in zip(output.outputs[0].logprobs, output.outputs[0].token_ids)]
        assert ours == pytest.approx(expected, abs=1e-4)
