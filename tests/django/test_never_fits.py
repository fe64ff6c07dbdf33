"""A refusal that waiting cannot cure says so (`x-should-retry: false`, no Retry-After): the batch
runner fails such a line at once instead of retrying it forever, and the openai SDK stops too."""
import pytest

from tests.django.admission_testing import burst_of, key_prefix, make_api_key, run  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("db")


def test_a_request_larger_than_the_tokens_per_minute_is_not_to_be_retried(key_prefix):
    api_key = make_api_key(tokens_per_minute=100)
    [refused] = run(burst_of(api_key, key_prefix, [(80, 40)])).refused
    assert refused.headers["x-should-retry"] == "false" and "Retry-After" not in refused.headers


def test_a_full_window_is_to_be_retried(key_prefix):
    api_key = make_api_key(tokens_per_minute=100)
    burst = run(burst_of(api_key, key_prefix, [(60, 0), (60, 0)]))
    [refused] = burst.refused
    assert int(refused.headers["Retry-After"]) >= 1 and "x-should-retry" not in refused.headers
