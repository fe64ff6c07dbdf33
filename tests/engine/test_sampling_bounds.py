"""SamplingParams refuses every value the engine cannot represent or that would make one request
costly for everyone (issue 15, findings 1 and 2): a ValueError naming the field, never an error
later inside a batched step."""

import pytest

from engine.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SamplingParams

HUGE = 2**64
OUT_OF_RANGE = [
    ("top_k", 2**63), ("top_k", HUGE), ("top_k", True),
    ("n", 10_000), ("n", HUGE),
    ("seed", 2**63), ("seed", -(2**63) - 1), ("seed", HUGE), ("seed", True),
    ("max_tokens", HUGE), ("min_tokens", HUGE),
    ("logprobs", 2**31), ("logprobs", HUGE), ("prompt_logprobs", 2**31),
    ("stop_token_ids", [HUGE]), ("stop_token_ids", [2**31]), ("stop_token_ids", list(range(2000))),
    ("temperature", float("inf")), ("temperature", 10**400), ("repetition_penalty", float("inf")),
    ("presence_penalty", float("nan")), ("top_p", float("nan")), ("min_p", float("inf")),
    ("stop", ["x"] * (MAX_STOP_STRINGS + 1)), ("stop", ["x" * (MAX_STOP_STRING_CHARS + 1)]),
    ("stop", ["\ud800"]),
]


@pytest.mark.parametrize("field_name, value", OUT_OF_RANGE,
                         ids=[f"{f}={str(v)[:20]}" for f, v in OUT_OF_RANGE])
def test_values_the_engine_cannot_represent_are_refused(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        SamplingParams(**{field_name: value})


def test_values_at_the_bounds_are_accepted():
    params = SamplingParams(n=256, seed=2**63 - 1, top_k=2**31 - 1, logprobs=20, prompt_logprobs=0,
                            stop=["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS, stop_token_ids=[0, 2**31 - 1])
    assert params.top_k == 2**31 - 1
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)
    assert SamplingParams(top_k=-1).top_k == 0
