"""From an OpenAI request to SamplingParams fields (a pure function: no database, no engine)."""

from __future__ import annotations

import pytest

from inference.errors import OpenAIError
from inference.sampling import sampling_fields

MODEL_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "not_a_field": 3}


def test_a_field_left_out_takes_the_models_default_and_a_given_one_wins():
    fields = sampling_fields({"temperature": None, "top_p": 0.5}, max_tokens=8, logprobs=None,
                             model_defaults=MODEL_DEFAULTS)
    assert (fields["temperature"], fields["top_p"], fields["top_k"]) == (0.6, 0.5, 20)
    assert "not_a_field" not in fields and fields["max_tokens"] == 8


def test_the_tenants_default_wins_over_the_models_and_the_call_over_both():
    fields = sampling_fields({"top_k": 5}, max_tokens=8, logprobs=None, model_defaults=MODEL_DEFAULTS,
                             tenant_defaults={"temperature": 0.2, "top_k": 50, "min_p": 0.1})
    assert (fields["temperature"], fields["top_p"], fields["top_k"], fields["min_p"]) == (0.2, 0.95, 5, 0.1)


def test_a_zero_given_by_the_call_is_not_replaced():
    fields = sampling_fields({"temperature": 0, "top_k": 0}, max_tokens=8, logprobs=None, model_defaults=MODEL_DEFAULTS)
    assert (fields["temperature"], fields["top_k"]) == (0, 0)


def test_without_model_defaults_openais_apply():
    fields = sampling_fields({}, max_tokens=4, logprobs=2)
    assert (fields["temperature"], fields["top_p"], fields["top_k"], fields["logprobs"]) == (1.0, 1.0, 0, 2)


def test_a_bad_value_is_a_400_naming_the_field():
    with pytest.raises(OpenAIError) as error:
        sampling_fields({"top_p": 0}, max_tokens=4, logprobs=None)
    assert error.value.status == 400 and "top_p" in str(error.value)
