"""The engine on a GPU: Triton kernels and CUDA graphs against transformers, sized by memory."""

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.conftest import assert_greedy_matches_transformers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    return path, model.eval()


@pytest.mark.parametrize("enforce_eager, async_scheduling", [(False, True), (False, False), (True, True)],
                         ids=["cuda-graphs", "cuda-graphs-sync", "eager"])
def test_greedy_matches_transformers_on_cuda(tiny_llama_dir, enforce_eager, async_scheduling):
    """Requests finish at different steps, so decode batches shrink from 4 to 1 (3 replays the graph
    of 4, padded); the 700-token prompt spreads its decode attention over several splits. With async
    scheduling each decode's input token comes from the previous step on the device."""
    path, hf = tiny_llama_dir
    torch.backends.cuda.matmul.allow_tf32 = False
    hf = hf.to("cuda")
    llm = LLM(model=str(path), dtype="float32", device="cuda", skip_tokenizer_init=True, block_size=16,
              num_gpu_blocks_override=128, enforce_eager=enforce_eager, async_scheduling=async_scheduling)
    assert (llm.llm_engine.runner.cuda_graphs is None) == enforce_eager
    lengths = (5, 40, 130, 700, 1)
    prompts = [[(7 * i + 3 * j) % 500 + 1 for j in range(length)] for i, length in enumerate(lengths)]
    assert_greedy_matches_transformers(llm, hf, prompts, [12, 3, 9, 6, 1])


def test_kv_cache_is_sized_from_gpu_memory_utilization():
    free, total = torch.cuda.mem_get_info()
    llm = LLM(model="dummy:smollm2-135m", dtype="bfloat16", skip_tokenizer_init=True, gpu_memory_utilization=0.3)
    runner = llm.llm_engine.runner
    assert runner.device.type == "cuda" and runner.num_blocks > 1000
    assert torch.cuda.memory_allocated() <= 0.3 * total
    outputs = llm.generate([{"prompt_token_ids": list(range(100, 150))}] * 4,
                           SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)
