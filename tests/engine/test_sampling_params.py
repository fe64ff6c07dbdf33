"""SamplingParams: vLLM's names and defaults, and a ValueError naming the field for every bad value."""

import pytest

from engine.sampling_params import RequestOutputKind, SamplingParams

INVALID = [
    ("n", 0), ("n", -1), ("n", 1.5),
    ("temperature", -0.1), ("temperature", "hot"), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.01), ("min_p", 1.5),
    ("presence_penalty", 2.1), ("presence_penalty", -2.1),
    ("frequency_penalty", 2.5), ("frequency_penalty", -3),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 2.0),
    ("min_tokens", -1),
    ("logprobs", -1), ("logprobs", 1.5),
    ("prompt_logprobs", -1),
    ("stop", [""]), ("stop", ["ok", 3]),
    ("stop_token_ids", [-1]),
    ("seed", "abc"), ("seed", 1.5),
]


@pytest.mark.parametrize("field_name, value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_raises_value_error_naming_the_field(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        SamplingParams(**{field_name: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)
    assert SamplingParams(min_tokens=5, max_tokens=5).min_tokens == 5


def test_defaults_match_vllm():
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert params.max_tokens == 16 and params.min_tokens == 0
    assert params.stop == [] and params.stop_token_ids == []
    assert params.seed is None and params.logprobs is None and params.prompt_logprobs is None
    assert not params.ignore_eos and not params.include_stop_str_in_output and params.skip_special_tokens
    assert not params.is_greedy and not params.needs_penalties


def test_boundary_values_are_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=1, min_p=1.0, presence_penalty=2.0, frequency_penalty=-2.0,
                   repetition_penalty=0.5, max_tokens=1, logprobs=0, prompt_logprobs=0, seed=0, n=3)
    SamplingParams(max_tokens=None, min_tokens=100)


def test_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []


def test_top_k_minus_one_means_disabled():
    assert SamplingParams(top_k=-1).top_k == 0


def test_greedy_and_penalty_flags():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(repetition_penalty=1.1).needs_penalties
    assert SamplingParams(presence_penalty=0.5).needs_penalties
    assert SamplingParams(frequency_penalty=-0.5).needs_penalties


def test_clone_copies_and_validates():
    params = SamplingParams(temperature=0.5, stop=["x"])
    clone = params.clone(output_kind=RequestOutputKind.DELTA)
    assert clone.output_kind == RequestOutputKind.DELTA and clone.temperature == 0.5
    assert params.output_kind == RequestOutputKind.CUMULATIVE
    with pytest.raises(ValueError, match="temperature"):
        params.clone(temperature=-1)

