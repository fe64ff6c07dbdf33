"""LoRA in the engine against transformers + PEFT (float32, CPU).

Tiny random checkpoints (conftest.TINY_VARIANTS) get random PEFT adapters made with the `peft`
package (`init_lora_weights=False`, so B is not zero and every adapter changes the model) on all of
q/k/v/o/gate/up/down, of ranks 4, 8 and 16, one with rsLoRA. The engine's greedy tokens must equal
PEFT's `generate` and its logprobs PEFT's log-softmax; mixing adapters in one batch must give each
request what it gets alone; more adapters than slots (and than the host cache) must all finish;
the prefix cache must never serve one adapter's KV to another; bad adapters fail at add_request.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.lora.peft_config import LoRAAdapterError
from engine.lora.request import LoRARequest
from tests.engine.conftest import TINY_VOCAB, build_tiny_hf_model, hf_log_softmax

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_PROJECTIONS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # all a mixture of experts takes
MOE_VARIANTS = ("mixtral", "qwen2-moe", "qwen3-moe")
# name -> (rank, lora_alpha, use_rslora, seed)
ADAPTERS = {"r4": (4, 8, False, 1), "r8": (8, 16, False, 2), "r16": (16, 8, False, 3), "rs8": (8, 4, True, 4)}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=TINY_VOCAB)
ENGINE = dict(dtype="float32", block_size=4, num_gpu_blocks_override=256, seed=0, enable_lora=True, max_loras=4,
              max_lora_rank=16)


def make_peft_adapter(hf_model, folder, rank, alpha, use_rslora, seed, targets=ALL_PROJECTIONS, parameters=None):
    """Save a random PEFT adapter for `hf_model` in `folder`; returns the PEFT model (the reference).
    `parameters`: PEFT's target_parameters (a mixture of experts' stacked expert weights)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=targets, lora_dropout=0.0,
                        init_lora_weights=False, target_parameters=parameters)
    peft_model = get_peft_model(copy.deepcopy(hf_model), config)
    with torch.no_grad():  # B at PEFT's random init moves the logits a lot; keep the model sane but changed
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)
    peft_model.save_pretrained(str(folder))
    return peft_model.eval()


@pytest.fixture(scope="module")
def adapters(tiny_hf_checkpoint, tmp_path_factory):
    """`adapters(variant) -> {name: (LoRARequest, peft_model)}`, one set per variant."""
    built = {}

    def get(variant):
        if variant not in built:
            _, hf_model = tiny_hf_checkpoint(variant)
            targets = (PHI3_PROJECTIONS if variant.startswith("phi3") else
                       ATTENTION_PROJECTIONS if variant in MOE_VARIANTS else ALL_PROJECTIONS)
            built[variant] = {}
            for int_id, (name, (rank, alpha, rslora, seed)) in enumerate(ADAPTERS.items(), start=1):
                folder = tmp_path_factory.mktemp(f"lora-{variant}-{name}")
                peft_model = make_peft_adapter(hf_model, folder, rank, alpha, rslora, seed, targets)
                built[variant][name] = (LoRARequest(name, int_id, str(folder)), peft_model)
        return built[variant]

    return get


@pytest.fixture(scope="module")
def lora_llm(tiny_hf_checkpoint):
    built = {}

    def get(variant, **options):
        key = (variant, tuple(sorted(options.items())))
        if key not in built:
            built[key] = LLM(model=str(tiny_hf_checkpoint(variant)[0]), **(ENGINE | options))
        return built[key]

    return get


def prompts(count=3):
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=generator).tolist() for n in (7, 18, 29)[:count]]


def peft_greedy(peft_model, prompt, max_tokens=8):
    with torch.no_grad():
        generated = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
    return generated[0, len(prompt):].tolist()


def logprob_matrix(entries):
    matrix = torch.full((len(entries), TINY_VOCAB), float("nan"))
    for row, entry in enumerate(entries):
        for token_id, logprob in entry.items():
            matrix[row, token_id] = logprob.logprob
    return matrix


def run(llm, prompt_list, lora_request=None, params=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompt_list], params, use_tqdm=False,
                        lora_request=lora_request)


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_each_adapter_matches_transformers_and_peft(lora_llm, adapters, tiny_hf_checkpoint, variant):
    llm, base_model = lora_llm(variant), tiny_hf_checkpoint(variant)[1]
    base_tokens = [peft_greedy(base_model, p) for p in prompts()]
    for name, (lora_request, peft_model) in adapters(variant).items():
        outputs = run(llm, prompts(), lora_request)
        for prompt, output, base in zip(prompts(), outputs, base_tokens):
            tokens = output.outputs[0].token_ids
            assert tokens == peft_greedy(peft_model, prompt), f"adapter {name}"
            reference = hf_log_softmax(peft_model, prompt + tokens[:-1])[len(prompt) - 1:]
            torch.testing.assert_close(logprob_matrix(output.outputs[0].logprobs), reference, atol=1e-4, rtol=0)
        assert [o.outputs[0].token_ids for o in outputs] != base_tokens, f"adapter {name} changes nothing"


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_one_request_alone_matches_peft(lora_llm, adapters, tiny_hf_checkpoint, variant):
    """Alone, a request's prompt (at most 32 tokens) and its decode steps are small steps: each
    projection's GEMM then also computes every slot's shrink (the slots' A rows under the base weight;
    Qwen2's q/k/v bias stays off them). Three prompts together (54 tokens) take the shrink kernel."""
    llm = lora_llm(variant)
    for name, (lora_request, peft_model) in adapters(variant).items():
        for prompt in prompts():
            output = run(llm, [prompt], lora_request)[0].outputs[0]
            assert output.token_ids == peft_greedy(peft_model, prompt), f"adapter {name}"
            reference = hf_log_softmax(peft_model, prompt + output.token_ids[:-1])[len(prompt) - 1:]
            torch.testing.assert_close(logprob_matrix(output.logprobs), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["phi3-short-rope", "olmo2", "qwen3", "granite", "gemma", "gemma2", "gemma3"])
def test_every_architecture_takes_adapters(lora_llm, adapters, variant):
    """Phi-3's adapters name its fused qkv_proj / gate_up_proj; the others (Gemma's GeGLU too) the separate
    projections (Phi-3 with short RoPE factors only: transformers switches LongRoPE factors mid-generation
    past 8 tokens)."""
    llm = lora_llm(variant)
    lora_request, peft_model = adapters(variant)["r8"]
    for prompt, output in zip(prompts(), run(llm, prompts(), lora_request)):
        assert output.outputs[0].token_ids == peft_greedy(peft_model, prompt)


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_a_mixture_of_experts_takes_adapters_on_its_attention(lora_llm, adapters, tiny_hf_checkpoint, variant):
    """The experts stay the fused kernel's; q/k/v/o adapters give PEFT's greedy tokens, and change them."""
    llm = lora_llm(variant)
    base_model = tiny_hf_checkpoint(variant)[1]
    lora_request, peft_model = adapters(variant)["r8"]
    outputs = run(llm, prompts(), lora_request)
    for prompt, output in zip(prompts(), outputs):
        assert output.outputs[0].token_ids == peft_greedy(peft_model, prompt)
    assert [o.outputs[0].token_ids for o in outputs] != [peft_greedy(base_model, p) for p in prompts()]


EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def expert_adapters(tiny_hf_checkpoint, tmp_path_factory):
    """`expert_adapters(variant) -> {name: (LoRARequest, peft_model)}`: PEFT adapters on the attention
    and on the stacked experts (target_parameters), one rank-8 and one rsLoRA rank-4 on the experts only."""
    built = {}

    def get(variant):
        if variant not in built:
            hf_model = tiny_hf_checkpoint(variant)[1]
            built[variant] = {}
            for int_id, (name, rank, alpha, rslora, targets) in enumerate(
                    [("both", 8, 16, False, ATTENTION_PROJECTIONS), ("experts", 4, 8, True, [])], start=50):
                folder = tmp_path_factory.mktemp(f"lora-experts-{variant}-{name}")
                peft_model = make_peft_adapter(hf_model, folder, rank, alpha, rslora, int_id, targets,
                                               EXPERT_PARAMETERS)
                built[variant][name] = (LoRARequest(f"{variant}-{name}", int_id, str(folder)), peft_model)
        return built[variant]

    return get


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_a_mixture_of_experts_takes_adapters_on_its_experts(lora_llm, expert_adapters, tiny_hf_checkpoint,
                                                             variant):
    """PEFT's LoRA on transformers' stacked expert weights: every (token, expert) pair of an adapter's
    tokens gets its expert's delta, in one batch with the base model's requests and another adapter's."""
    llm, base_model = lora_llm(variant), tiny_hf_checkpoint(variant)[1]
    cases = [(request, peft_model) for request, peft_model in expert_adapters(variant).values()]
    cases.append((None, base_model))
    batch = [(prompt, request, model) for prompt in prompts() for request, model in cases]
    outputs = llm.generate([{"prompt_token_ids": p} for p, _, _ in batch], GREEDY, use_tqdm=False,
                           lora_request=[request for _, request, _ in batch])
    for (prompt, request, model), output in zip(batch, outputs):
        tokens = output.outputs[0].token_ids
        assert tokens == peft_greedy(model, prompt), f"adapter {request and request.lora_name}"
        reference = hf_log_softmax(model, prompt + tokens[:-1])[len(prompt) - 1:]
        torch.testing.assert_close(logprob_matrix(output.outputs[0].logprobs), reference, atol=1e-4, rtol=0)
    experts_only = [o.outputs[0].token_ids for (_, r, _), o in zip(batch, outputs) if r is cases[1][0]]
    assert experts_only != [peft_greedy(base_model, p) for p in prompts()], "the expert adapter changes nothing"


def test_expert_matrices_nest_in_the_experts_parameter_order_whatever_the_config_lists(
        lora_llm, expert_adapters, tmp_path):
    """PEFT wraps gate_up_proj first (the module's order), so its matrices sit under `.base_layer`; the
    config's target_parameters list is a set's, in either order."""
    llm = lora_llm("mixtral")
    request, peft_model = expert_adapters("mixtral")["both"]
    folder = tmp_path / "reversed"
    shutil.copytree(request.lora_path, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    names = config["target_parameters"]
    for int_id, order in enumerate((sorted(names), sorted(names, reverse=True)), start=90):
        (folder / "adapter_config.json").write_text(json.dumps(config | {"target_parameters": order}))
        reordered = LoRARequest(f"reordered-{int_id}", int_id, str(folder))  # a new id: read from disk again
        assert run(llm, prompts(1), reordered)[0].outputs[0].token_ids == peft_greedy(peft_model, prompts(1)[0])


def test_an_adapter_on_a_mixture_of_experts_mlp_is_refused_by_name(lora_llm, adapters, tmp_path):
    """A gate_proj matrix (an adapter made for a dense model), and one on Qwen2-MoE's shared expert
    (a module PEFT can name there): clear errors at add_request, the engine unharmed."""
    from safetensors.torch import load_file, save_file

    llm = lora_llm("qwen2-moe")
    good, good_model = adapters("qwen2-moe")["r8"]
    tensors = load_file(str(Path(good.lora_path) / "adapter_model.safetensors"))
    rank, hidden = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape
    cases = {"mlp.gate_proj": "mixture of experts: LoRA applies to its attention projections",
             "mlp.shared_expert.gate_proj": "module 'mlp.shared_expert.gate_proj'"}
    for int_id, (module, words) in enumerate(cases.items(), start=200):
        folder = tmp_path / module
        shutil.copytree(good.lora_path, folder)
        extra = {f"base_model.model.model.layers.0.{module}.lora_A.weight": torch.zeros(rank, hidden),
                 f"base_model.model.model.layers.0.{module}.lora_B.weight": torch.zeros(8, rank)}
        save_file(tensors | extra, str(folder / "adapter_model.safetensors"))
        with pytest.raises(LoRAAdapterError, match=words):
            run(llm, prompts(1), LoRARequest(module, int_id, str(folder)))
    assert run(llm, prompts(1), good)[0].outputs[0].token_ids == peft_greedy(good_model, prompts(1)[0])


def test_a_batch_mixing_four_adapters_and_the_base_gives_each_its_own_answer(lora_llm, adapters):
    llm, loras = lora_llm("llama"), [request for request, _ in adapters("llama").values()]
    choices = [*loras, None]
    alone = {(i, j): run(llm, [p], choice)[0] for i, p in enumerate(prompts()) for j, choice in enumerate(choices)}
    keys = sorted(alone)
    mixed = run(llm, [prompts()[i] for i, _ in keys], [choices[j] for _, j in keys])
    for key, output in zip(keys, mixed):
        want = alone[key].outputs[0]
        assert output.outputs[0].token_ids == want.token_ids, key
        torch.testing.assert_close(logprob_matrix(output.outputs[0].logprobs), logprob_matrix(want.logprobs),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_more_adapters_than_slots_and_host_cache_all_finish(lora_llm, adapters, async_scheduling):
    """max_loras=2 slots and 2 in host memory for 4 adapters: the scheduler defers, the LRU reloads;
    no step's running set ever holds more than 2 adapters. Async scheduling plans a step while the one
    before runs: slots change between steps in flight."""
    llm = lora_llm("llama", max_loras=2, max_cpu_loras=2, async_scheduling=async_scheduling)
    engine = llm.llm_engine
    expected = {}
    for n, (name, (lora_request, peft_model)) in enumerate(adapters("llama").items()):
        for i, prompt in enumerate(prompts()):
            engine.add_request(f"{name}-{i}", {"prompt_token_ids": prompt}, GREEDY, lora_request=lora_request)
            expected[f"{name}-{i}"] = peft_greedy(peft_model, prompt)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
        assert len({r.lora_int_id for r in engine.scheduler.running}) <= 2
        assert len(engine.list_loras()) <= 2
    assert finished == expected


def test_prefix_cache_never_crosses_adapters(lora_llm, adapters, tiny_hf_checkpoint):
    llm = lora_llm("llama", max_loras=2)
    llm.reset_prefix_cache()
    (first, first_model), (second, second_model) = list(adapters("llama").values())[:2]
    prompt = prompts()[2]  # 29 tokens: 7 full blocks of 4
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    under_first = run(llm, [prompt], first, params)[0]
    under_second = run(llm, [prompt], second, params)[0]
    under_base = run(llm, [prompt], None, params)[0]
    again_first = run(llm, [prompt], first, params)[0]
    assert under_first.outputs[0].token_ids == peft_greedy(first_model, prompt)
    assert under_second.outputs[0].token_ids == peft_greedy(second_model, prompt)
    assert under_base.outputs[0].token_ids == peft_greedy(tiny_hf_checkpoint("llama")[1], prompt)
    assert under_second.num_cached_tokens == under_base.num_cached_tokens == 0
    assert again_first.num_cached_tokens == 28
    assert again_first.outputs[0].token_ids == under_first.outputs[0].token_ids


def _write_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def bad_adapters(good_folder, tmp_path):
    """name -> (folder, words the error must contain)."""
    cases = {"missing": (tmp_path / "nowhere", "does not exist")}
    malformed = tmp_path / "malformed"
    shutil.copytree(good_folder, malformed)
    (malformed / "adapter_config.json").write_text('{"r": 8, "lora_alpha": ')
    cases["malformed"] = (malformed, "not valid JSON")
    too_wide = tmp_path / "rank32"
    make_peft_adapter(build_tiny_hf_model("llama"), too_wide, 32, 32, False, 5)
    cases["rank"] = (too_wide, "max_lora_rank=16")
    import transformers

    wider = transformers.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)  # another model's hidden size
    other = transformers.AutoModelForCausalLM.from_config(wider, dtype=torch.float32)
    make_peft_adapter(other, tmp_path / "wrong-shape", 8, 8, False, 6)
    cases["shape"] = (tmp_path / "wrong-shape", "has shape")
    unsupported = tmp_path / "embed"
    make_peft_adapter(build_tiny_hf_model("llama"), unsupported, 8, 8, False, 7, ["q_proj", "embed_tokens"])
    cases["target"] = (unsupported, "not supported")
    return cases


def test_bad_adapters_fail_at_add_request_and_leave_running_requests_alone(lora_llm, adapters, tmp_path):
    llm = lora_llm("llama")
    engine = llm.llm_engine
    good, good_model = adapters("llama")["r8"]
    prompt = prompts()[1]
    engine.add_request("good", {"prompt_token_ids": prompt}, GREEDY, lora_request=good)
    outputs = engine.step()
    for int_id, (name, (folder, words)) in enumerate(bad_adapters(Path(good.lora_path), tmp_path).items(), start=100):
        with pytest.raises(LoRAAdapterError, match=words):
            engine.add_request(f"bad-{name}", {"prompt_token_ids": prompt}, GREEDY,
                               lora_request=LoRARequest(name, int_id, str(folder)))
        outputs += engine.step()
    while engine.has_unfinished_requests():
        outputs += engine.step()
    finished = [o for o in outputs if o.finished]
    assert [o.request_id for o in finished] == ["good"]
    assert finished[0].outputs[0].token_ids == peft_greedy(good_model, prompt)


def test_an_adapter_on_an_engine_without_lora_is_refused(tiny_hf_checkpoint, adapters):
    llm = LLM(model=str(tiny_hf_checkpoint("llama")[0]), dtype="float32", num_gpu_blocks_override=64)
    lora_request, _ = adapters("llama")["r4"]
    with pytest.raises(ValueError, match="enable_lora=True"):
        run(llm, prompts(1), lora_request)


def test_one_id_never_names_two_adapters(lora_llm, adapters):
    llm = lora_llm("llama")
    first, second = (request for request, _ in list(adapters("llama").values())[:2])
    llm.llm_engine.add_lora(first)
    with pytest.raises(ValueError, match="an id of its own"):
        run(llm, prompts(1), LoRARequest(second.lora_name, first.lora_int_id, second.lora_path))


@pytest.mark.slow
def test_two_ranks_with_adapters_match_one(tiny_hf_checkpoint, adapters):
    loras = [request for request, _ in adapters("llama").values()]
    assert_two_ranks_match_one(tiny_hf_checkpoint("llama")[0], [loras[0], loras[3], None])


def test_two_ranks_with_expert_adapters_match_one(tiny_hf_checkpoint, expert_adapters):
    """Each rank holds its slice of every expert's intermediate rows, and of their adapters' B (gate/up)
    and A (down)."""
    loras = [request for request, _ in expert_adapters("mixtral").values()]
    assert_two_ranks_match_one(tiny_hf_checkpoint("mixtral")[0], [loras[0], loras[1], None])


def assert_two_ranks_match_one(folder, choices):
    def generate(size):
        llm = LLM(model=str(folder), tensor_parallel_size=size, **ENGINE)
        try:
            return run(llm, prompts(), choices, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        finally:
            llm.llm_engine.shutdown()

    assert [o.outputs[0].token_ids for o in generate(2)] == [o.outputs[0].token_ids for o in generate(1)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_adapters_on_cuda_match_peft(tiny_hf_checkpoint, adapters, enforce_eager):
    """The Triton shrink/expand kernels, inside the decode CUDA graphs too, with async scheduling and
    two slots for four adapters (slot swaps queued behind the step in flight)."""
    loras = list(adapters("llama").values())
    choices = [loras[i % 4][0] if i % 5 else None for i in range(10)]
    assert_cuda_matches_peft(tiny_hf_checkpoint("llama"), loras, choices, max_loras=2, enforce_eager=enforce_eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_expert_adapters_on_cuda_match_peft(tiny_hf_checkpoint, expert_adapters, enforce_eager):
    """Mixtral's expert adapters through the fused MoE kernel and the batched LoRA kernels, the pair
    mapping refilled inside the decode CUDA graphs, with async scheduling and one slot for two adapters."""
    loras = list(expert_adapters("mixtral").values())
    choices = [loras[i % 2][0] if i % 3 else None for i in range(6)]
    assert_cuda_matches_peft(tiny_hf_checkpoint("mixtral"), loras, choices, max_loras=1, enforce_eager=enforce_eager)


def assert_cuda_matches_peft(checkpoint, loras, choices, max_loras: int, enforce_eager: bool) -> None:
    """`choices[i]` (an adapter of `loras`, or None: the base) for prompt i % 3: PEFT's greedy tokens on CUDA."""
    torch.backends.cuda.matmul.allow_tf32 = False
    folder, base_model = checkpoint
    llm = LLM(model=str(folder), **(ENGINE | dict(
        device="cuda", max_loras=max_loras, enforce_eager=enforce_eager, async_scheduling=True)))
    assert (llm.llm_engine.runner.cuda_graphs is None) == enforce_eager
    prompt_list = [prompts()[i % 3] for i in range(len(choices))]
    outputs = run(llm, prompt_list, choices, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    references = {lora.lora_int_id: model for lora, model in loras}
    for prompt, choice, output in zip(prompt_list, choices, outputs):
        model = base_model if choice is None else references[choice.lora_int_id]
        assert output.outputs[0].token_ids == peft_greedy(model, prompt)
