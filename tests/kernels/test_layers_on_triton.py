"""The model's layers wired to the Triton kernels, as CUDA picks them (interpreted here), give what
the torch references give: through chunked prefill, prefix-cache hits and steps that mix decodes
with prefill chunks. Catches wiring mistakes (argument order, in-place rotary on strided q/k views,
the prefill rows of the shared output, the greedy argmax) that the per-kernel tests cannot."""

from types import SimpleNamespace

import pytest
import torch

from engine import LLM, SamplingParams
from engine.layers import activation, attention, norm, sampler
from kernels import triton_or_reference


def save_tiny_qwen3(path) -> None:
    """Qwen3: grouped-query attention, and per-head q/k RMSNorm besides the residual ones."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         initializer_range=0.2, architectures=["Qwen3ForCausalLM"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norm weights start at 1; randomise them so they matter
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)


@pytest.fixture(scope="module", params=["qwen3", "gemma2", "gemma3"])
def tiny_model(request, tmp_path_factory):
    """Besides Qwen3: Gemma 2 and 3 at Gemma's head size (256) with an 8-token window on the local
    layers, the attention (Gemma 2) and final soft-caps, GeGLU, (1 + w) norms, Gemma 3's q/k norms."""
    from tests.engine.conftest import build_tiny_hf_model

    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    if request.param == "qwen3":
        save_tiny_qwen3(path)
    else:
        build_tiny_hf_model(request.param, head_dim=256).save_pretrained(path)
    return path


def run(path) -> list[list[float]]:
    """Log-probabilities of every prompt token after the first and of every generated token."""
    llm = LLM(model=str(path), dtype="float32", device="cpu", skip_tokenizer_init=True, block_size=16,
              num_gpu_blocks_override=32, max_num_batched_tokens=40)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0)
    prompts = [[(5 * i + 3 * j) % 120 + 1 for j in range(length)] for i, length in enumerate((1, 21, 50))]
    with_prompt_logprobs = greedy.clone(prompt_logprobs=0)  # such requests bypass the prefix cache
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], [with_prompt_logprobs] * 2 + [greedy],
                           use_tqdm=False)
    # A prefix-cache hit: the 50-token prompt's first 48 tokens (3 blocks) are cached, so this
    # prompt's chunk starts after them, two tokens into a block.
    outputs += llm.generate([{"prompt_token_ids": prompts[2] + [9, 8, 7, 6]}], greedy, use_tqdm=False)
    assert outputs[-1].num_cached_tokens == 48
    return [logprobs_of(output) for output in outputs]


def logprobs_of(output) -> list[float]:
    prompt = output.prompt_logprobs[1:] if output.prompt_logprobs else []  # the first token has none
    return [lp.logprob for position in prompt + output.outputs[0].logprobs for lp in position.values()]


def use_triton_everywhere(monkeypatch):
    """Every layer picks as if its tensors were on CUDA."""
    on_cuda = SimpleNamespace(is_cuda=True)
    for layer in (activation, attention, norm, sampler):
        monkeypatch.setattr(layer, "triton_or_reference",
                            lambda tensor, kernel, reference: triton_or_reference(on_cuda, kernel, reference))


def test_triton_layers_match_the_torch_references(tiny_model, monkeypatch):
    expected = run(tiny_model)
    use_triton_everywhere(monkeypatch)
    actual = run(tiny_model)
    for logprobs, expected_logprobs in zip(actual, expected, strict=True):
        assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)
