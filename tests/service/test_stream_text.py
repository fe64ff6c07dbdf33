"""Plain streams' text made by the web process (inference/stream_text.py) against the real replica:
the replica sends token ids only, and the text the web process makes is the engine's own."""
from __future__ import annotations

import asyncio

import pytest
from tokenizers import Tokenizer

from engine.service.protocol import ModelCard
from inference.generation import GenerationPlan, generate
from inference.stream_text import web_detokenizes

pytestmark = pytest.mark.timeout(300)
# Sampled at a high temperature from a seed: odd tokens, byte pieces of characters among them; the
# same seed gives both runs the same tokens.
SAMPLED = {"temperature": 1.6, "seed": 7, "max_tokens": 40, "n": 2}
PROMPTS = ["Emoji and accents: 😀 café naïve", "日本語で答えてください:", "The capital of France is"]


@pytest.fixture(scope="module")
def svc(module_service):
    module_service.start_replica("r")
    return module_service


def run(svc, plan: GenerationPlan) -> tuple[dict, dict]:
    """Text and token ids of each (prompt, choice), and the raw deltas' texts seen by the client."""
    texts, token_ids = {}, {}

    async def main():
        async with svc.client() as client:
            async for prompt_index, delta in generate(client, plan):
                for output in delta.outputs:
                    key = (prompt_index, output.index)
                    texts[key] = texts.get(key, "") + output.text
                    token_ids[key] = token_ids.get(key, []) + output.token_ids

    asyncio.run(main())
    return texts, token_ids


def test_the_web_process_makes_the_engine_s_text_from_token_ids(svc):
    async def card_and_raw_texts():
        async with svc.client() as client:
            card = await client.model_card(svc.MODEL)
            request = svc.request(PROMPTS[0], detokenize=False, **SAMPLED)
            deltas = await svc.run(client, request)
            return card, [o.text for d in deltas for o in d.outputs], sum(len(o.token_ids) for d in deltas
                                                                            for o in d.outputs)

    card, raw_texts, raw_tokens = asyncio.run(card_and_raw_texts())
    assert card.streams_backend_text  # SmolLM2's decode() is its tokenizer JSON's own decoding
    assert raw_tokens > 40 and set(raw_texts) == {""}  # the replica skipped detokenizing: ids only
    tokenizer = Tokenizer.from_str(card.tokenizer_json)
    prompts = [tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    assert web_detokenizes(card, tokenizer, SAMPLED)

    in_engine = run(svc, GenerationPlan("call-engine", svc.MODEL, "t", prompts, SAMPLED))
    on_web = run(svc, GenerationPlan("call-web", svc.MODEL, "t", prompts, SAMPLED | {"detokenize": False},
                                     web_tokenizer=tokenizer))
    assert on_web[1] == in_engine[1]  # the same tokens (seeded)...
    assert on_web[0] == in_engine[0]  # ...and the same text, every choice of every prompt
    assert len(in_engine[0]) == 6 and all(in_engine[0].values())
    assert any(ord(ch) > 127 for text in in_engine[0].values() for ch in text)


@pytest.mark.parametrize("fields, web", [
    ({}, True), ({"stop": ["\n"]}, False), ({"logprobs": 2}, False), ({"prompt_logprobs": 0}, False),
    ({"stop": []}, True),
])
def test_a_stream_needs_the_engine_s_text_only_for_stop_strings_and_logprobs(fields, web):
    card = ModelCard("m", tokenizer_json="{}", streams_backend_text=True)
    tokenizer = object()
    assert web_detokenizes(card, tokenizer, {"max_tokens": 4, **fields}) is web
    assert not web_detokenizes(ModelCard("m", tokenizer_json="{}"), tokenizer, fields)  # a card that did not say so
    assert not web_detokenizes(card, None, fields)  # the engine runs without a tokenizer
