"""An engine shut down and dropped frees its model, even through a reference cycle: the engine
freezes the heap at start (gc.freeze, for the collector's cost per step), and frozen objects are
never collected until unfrozen. On the H200 the mixtral-8x7b preset found a KV budget of 0 bytes
behind the qwen3-30b-a3b engine that the same test process had shut down."""

import gc
import weakref

from engine import LLM, SamplingParams


def test_a_shut_down_engine_is_collected_even_through_a_reference_cycle():
    llm = LLM(model="dummy:smollm2-135m", skip_tokenizer_init=True, max_model_len=128, max_num_seqs=2,
              num_gpu_blocks_override=16)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    runner = llm.llm_engine.runner
    runner.cycle = runner  # as a frozen object, this cycle would keep the model alive for good
    model = weakref.ref(runner.model)
    llm.llm_engine.shutdown()
    llm = runner = None
    gc.collect()
    assert model() is None
