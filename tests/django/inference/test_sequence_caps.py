"""Sequences (n x prompts) capped per call and per tenant in flight, through the live API (issue 15, finding 5)."""
from __future__ import annotations

import openai
import pytest

from tests.service.conftest import wait_until

from .conftest import MODEL

pytestmark = pytest.mark.timeout(300)
ONE = {"model": MODEL, "prompt": "Hello", "max_tokens": 1}


def test_a_call_over_the_sequence_cap_is_a_400_before_anything_is_queued(live):
    key = live.new_key(max_sequences_per_request=16, max_concurrent_requests=1)
    client = live.openai(key)
    with pytest.raises(openai.BadRequestError) as info:  # the call: 128 x 64 = 8,192 sequences
        client.completions.create(**{**ONE, "prompt": ["Hello"] * 64}, n=128)
    error = info.value.body
    assert (error["code"], error["param"], error["type"]) == ("too_many_sequences", "n", "invalid_request_error")
    assert "8192 sequences (n=128 x 64 prompts)" in error["message"] and "at most 16" in error["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=17, max_tokens=1)
    # Nothing was admitted (the only concurrency slot is free) and calls at the cap run.
    assert len(client.completions.create(**{**ONE, "prompt": ["Hello"] * 4}, n=4).choices) == 16
    assert len(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=16,
                                              max_tokens=1).choices) == 16


def test_a_call_larger_than_the_tenants_in_flight_limit_is_a_400(live):
    client = live.openai(live.new_key(max_sequences_in_flight=8))
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**ONE, n=9)
    assert info.value.body["code"] == "too_many_sequences" and "at most 8" in info.value.body["message"]


def test_sequences_in_flight_are_held_per_tenant_until_the_call_ends(live):
    key = live.new_key(max_sequences_in_flight=4)
    client, other = live.openai(key), live.openai(live.new_key(max_sequences_in_flight=4))
    long = {**ONE, "prompt": ["Hello", "Bye"], "max_tokens": 2000, "stream": True, "extra_body": {"ignore_eos": True}}
    stream = client.completions.create(**long, n=2)  # 2 x 2 = all 4 of the tenant's sequences
    try:
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(**ONE)
        error, headers = info.value.body, info.value.response.headers
        assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
        assert "Limit 4 (max_sequences_in_flight), Running 4, Requested 1" in error["message"]
        assert int(headers["Retry-After"]) >= 1
        assert len(other.completions.create(**ONE, n=4).choices) == 4  # another tenant is not held back
    finally:
        stream.close()  # the client leaves: the call settles and gives its sequences back

    def admitted():
        try:
            return client.completions.create(**ONE, n=4)
        except openai.RateLimitError:
            return None

    assert len(wait_until(admitted, 20, "the sequences to be given back").choices) == 4
