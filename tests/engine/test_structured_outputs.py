"""Structured outputs in the engine: grammars compile in the background, every sampled token follows
the request's grammar (JSON Schema, regex, choice, Lark, GBNF), with and without async scheduling,
and the constrained distribution is the model's own renormalised over the allowed tokens."""

from __future__ import annotations

import json
import re
from concurrent.futures import Future

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams
from engine.layers.sampler import Sampler
from engine.request import Request
from engine.structured_outputs import StructuredOutputsParams
from engine.structured_outputs.manager import RequestGrammar, StructuredOutputManager
from tests.engine.conftest import TINY_VOCAB, build_tiny_hf_model
from tests.engine.test_sampler import CHI2_CRITICAL, chi_square

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"}},
        "required": ["name", "age", "email"], "additionalProperties": False},
    "order": {"type": "object", "properties": {
        "id": {"type": "integer"}, "status": {"enum": ["open", "shipped", "closed"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "maxLength": 8},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}}},
        "required": ["id", "status", "items"], "additionalProperties": False},
    "flags": {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 12}]}},
        "required": ["ok", "score", "tags", "note"], "additionalProperties": False},
}


def constrained(max_tokens=160, **kind) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_outputs=StructuredOutputsParams(**kind))


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(request):
    return LLM(dtype="float32", max_model_len=1024, async_scheduling=request.param)


def test_json_schemas_regex_choice_and_grammars_hold_in_one_batch(llm):
    """Constrained and free requests share steps; every constrained output is complete and valid."""
    prompts, params, checks = [], [], []
    for name, schema in SCHEMAS.items():
        prompts.append(CHAT.format(f"Give me a {name} as JSON."))
        params.append(constrained(json=schema))
        checks.append(lambda text, schema=schema: jsonschema.validate(json.loads(text), schema))
    prompts.append(CHAT.format("Any JSON object, please."))
    params.append(constrained(json_object=True))
    checks.append(lambda text: isinstance(json.loads(text), dict) or pytest.fail(text))
    cases = [(dict(regex=r"\(\d{3}\) \d{3}-\d{4}"), lambda t: re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", t)),
             (dict(choice=["yes", "no", "it depends"]), lambda t: t in {"yes", "no", "it depends"}),
             (dict(grammar='start: "The answer is " ("red" | "blue") "."'), lambda t: t in {
                 "The answer is red.", "The answer is blue."}),
             (dict(grammar='root ::= "[" [0-9] ("," [0-9])? "]"'), lambda t: re.fullmatch(r"\[\d(,\d)?\]", t))]
    for kind, check in cases:
        prompts.append(CHAT.format("Answer."))
        params.append(constrained(**kind))
        checks.append(lambda text, check=check: check(text) or pytest.fail(f"{text!r} breaks its grammar"))
    prompts.append("The capital of France is")  # an unconstrained neighbour
    params.append(SamplingParams(max_tokens=12, temperature=0.0))

    outputs = llm.generate(prompts, params, use_tqdm=False)
    for output, check in zip(outputs, checks):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", (completion.text, completion.finish_reason)
        check(completion.text)
    free = LLM.generate(llm, ["The capital of France is"], SamplingParams(max_tokens=12, temperature=0.0),
                        use_tqdm=False)[0]
    assert outputs[-1].outputs[0].text == free.outputs[0].text  # its neighbours left it alone


def test_sampled_json_follows_the_schema_for_every_seed_and_child(llm):
    schema = SCHEMAS["order"]
    params = SamplingParams(n=3, max_tokens=200, temperature=1.0, seed=7,
                            structured_outputs=StructuredOutputsParams(json=schema))
    [output] = llm.generate([CHAT.format("An order as JSON.")], params, use_tqdm=False)
    assert len(output.outputs) == 3
    for completion in output.outputs:
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)


def test_async_scheduling_constrains_exactly_as_sync():
    prompts = [CHAT.format(f"Give me a {name} as JSON.") for name in SCHEMAS]
    params = [SamplingParams(max_tokens=120, temperature=0.8, seed=i,
                             structured_outputs=StructuredOutputsParams(json=schema))
              for i, schema in enumerate(SCHEMAS.values())]
    texts = {}
    for async_scheduling in (False, True):
        engine = LLM(dtype="float32", max_model_len=1024, async_scheduling=async_scheduling)
        texts[async_scheduling] = [o.outputs[0].text for o in engine.generate(prompts, params, use_tqdm=False)]
    assert texts[True] == texts[False]


def test_a_grammar_the_library_refuses_is_a_value_error_naming_it(llm):
    for kind, words in [(dict(json={"type": "objectx"}), "json"), (dict(regex="a(b"), "regex"),
                        (dict(grammar="start: nothing_defined"), "grammar")]:
        with pytest.raises(ValueError, match=f"structured_outputs.{words} cannot be compiled"):
            llm.generate(["Hi"], constrained(**kind), use_tqdm=False)


def test_a_grammar_that_fails_in_the_background_aborts_only_its_request(llm):
    """`<|no_such_token|>` passes the tokenizer-free check and fails when the matcher is built."""
    engine = llm.llm_engine
    engine.add_request("bad", "Hi", constrained(grammar="start: <|no_such_token|>"))
    engine.add_request("good", "Hi", constrained(choice=["fine"]))
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    failed = engine.take_failed_requests()
    assert "no_such_token" in failed["bad"]
    assert finished["good"].outputs[0].text == "fine"
    assert engine.kv_cache_manager.block_pool.get_usage() == 0.0


def test_a_request_waits_in_the_queue_until_its_grammar_is_built(make_scheduler, make_request, bundled_tokenizer):
    manager = StructuredOutputManager(bundled_tokenizer, len(bundled_tokenizer), {2})
    built = manager.grammar_for("x", StructuredOutputsParams(choice=["a"])).future.result(timeout=30)
    scheduler = make_scheduler()
    pending = Future()
    compiling = make_request("compiling", [1, 2, 3])
    compiling.grammar = RequestGrammar(pending)
    other = make_request("other", [4, 5, 6])
    scheduler.add_request(compiling)
    scheduler.add_request(other)
    first = scheduler.schedule()
    assert list(first.num_scheduled_tokens) == ["other"]
    assert scheduler.num_waiting_for_grammar() == 1
    pending.set_result(built)
    second = scheduler.schedule()
    assert "compiling" in second.num_scheduled_tokens and "compiling" in second.structured_output_req_ids
    manager.shutdown()


def test_a_model_whose_stop_ids_lie_past_its_tokenizer_still_compiles(bundled_tokenizer):
    """A dummy Llama 3 preset (vocab 128,256, EOS 128009) borrowing the 49,152-token SmolLM2 tokenizer:
    llguidance refuses an EOS it cannot decode, so only the tokenizer's own ids are passed as stops."""
    manager = StructuredOutputManager(bundled_tokenizer, 128_256, {2, 128_009})
    grammar = manager.grammar_for("x", StructuredOutputsParams(choice=["yes", "no"]))
    grammar.future.result(timeout=30)
    assert grammar.is_ready() and manager.take_failed() == []
    assert manager.bitmask([(0, grammar)]).words.shape[1] == -(-128_256 // 32)
    manager.shutdown()


def test_the_constrained_distribution_is_the_model_renormalised_over_allowed_tokens(bundled_tokenizer):
    """A tiny random llama's next-token logits; a regex allowing some of its tokens; 20,000 draws."""
    model = build_tiny_hf_model("llama")
    with torch.no_grad():
        logits = model(torch.tensor([[5, 17, 42, 99]])).logits[0, -1].float()
    manager = StructuredOutputManager(bundled_tokenizer, TINY_VOCAB, {2})
    grammar = manager.grammar_for("r", StructuredOutputsParams(regex="[a-z]+"))
    grammar.future.result(timeout=30)
    assert grammar.is_ready()
    rows = 2000
    bitmask = manager.bitmask([(0, grammar)])
    bitmask.words = bitmask.words.expand(rows, -1).contiguous()
    bitmask.rows = list(range(rows))
    bits = [(int(bitmask.words[0, t // 32]) >> (t % 32)) & 1 for t in range(TINY_VOCAB)]
    allowed = [t for t in range(TINY_VOCAB) if bits[t]]
    probs = torch.softmax(logits, dim=-1)
    mass = float(probs[allowed].sum())
    assert len(allowed) > 5 and mass < 0.8  # a real restriction: unmasked draws would land outside it
    expected = {t: float(probs[t]) / mass for t in allowed}

    sampler = Sampler(seed=3, device=torch.device("cpu"))
    tokens = []
    for call in range(10):
        requests = [Request(f"c{call}-{i}", [0], SamplingParams(temperature=1.0)) for i in range(rows)]
        tokens += sampler(logits.expand(rows, -1).clone(), requests, bitmask).token_ids
    counts = {t: tokens.count(t) for t in set(tokens)}
    assert set(counts) <= set(allowed)
    statistic, dof = chi_square(counts, expected, len(tokens))
    assert statistic < CHI2_CRITICAL.get(dof, dof + 5 * dof ** 0.5 + 20), (statistic, dof)
    manager.shutdown()
