"""Scoring through the API, as OpenAI's legacy completions and vLLM offer it: `echo` with `logprobs`
and `max_tokens: 0` returns the prompt's tokens and logprobs (the first one null) and generates
nothing. Checked with the official `openai` SDK against the offline engine's prompt logprobs."""
from __future__ import annotations

import openai
import pytest

from .conftest import MODEL

pytestmark = pytest.mark.timeout(300)
PROMPTS = ["The capital of France is", "A computer program is a precise description of a process: the machine "
           "follows it exactly, never tires and never guesses."]
SCORE = {"model": MODEL, "echo": True, "logprobs": 2, "max_tokens": 0}
ATOL = 1e-3


@pytest.fixture(scope="module")
def client(live):
    return live.openai(live.new_key())


@pytest.fixture(scope="module")
def offline_logprobs():
    """Each prompt's token logprobs from the offline `LLM` (float32, as the live replica runs)."""
    from engine import LLM, SamplingParams

    llm = LLM(dtype="float32", num_gpu_blocks_override=64)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)
    return [[None] + [entry[t].logprob for t, entry in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]
            for o in outputs]


def assert_scores(choice, prompt: str, expected: list[float | None]) -> None:
    logprobs = choice.logprobs
    assert choice.text == prompt and "".join(logprobs.tokens) == prompt
    assert choice.finish_reason == "length"
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(expected[1:], abs=ATOL)
    for token, logprob, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]):
        assert top[token] == logprob and 2 <= len(top) <= 3


def test_echo_with_max_tokens_0_scores_the_prompt(client, offline_logprobs):
    reply = client.completions.create(prompt=PROMPTS[0], **SCORE)
    assert len(reply.choices) == 1
    assert_scores(reply.choices[0], PROMPTS[0], offline_logprobs[0])
    assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == len(offline_logprobs[0])


def test_a_list_of_prompts_scores_each(client, offline_logprobs):
    reply = client.completions.create(prompt=PROMPTS, **SCORE)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice, prompt, expected in zip(reply.choices, PROMPTS, offline_logprobs):
        assert_scores(choice, prompt, expected)
    assert reply.usage.completion_tokens == 0
    assert reply.usage.prompt_tokens == sum(len(e) for e in offline_logprobs)


def test_stream_gives_the_same_scores(client, offline_logprobs):
    chunks = list(client.completions.create(prompt=PROMPTS, stream=True, stream_options={"include_usage": True},
                                            **SCORE))
    choices = {c.choices[0].index: c.choices[0] for c in chunks if c.choices}
    assert sorted(choices) == [0, 1] and len(chunks) == 3  # one chunk per prompt, then usage
    for index, prompt in enumerate(PROMPTS):
        assert_scores(choices[index], prompt, offline_logprobs[index])
    assert chunks[-1].usage.completion_tokens == 0


def test_echo_without_logprobs_returns_the_prompt(client):
    choice = client.completions.create(model=MODEL, prompt=PROMPTS[0], echo=True, max_tokens=0).choices[0]
    assert (choice.text, choice.logprobs, choice.finish_reason) == (PROMPTS[0], None, "length")


def test_max_tokens_0_without_echo_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=PROMPTS[0], logprobs=2, max_tokens=0)
    assert error.value.body["param"] == "max_tokens"
