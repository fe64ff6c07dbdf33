"""A call's `user` reaches its usage event, from the openai SDK through the live server."""
from __future__ import annotations

from tenants.models import UsageEvent
from tests.service.conftest import wait_until

from .conftest import MODEL


def recorded(request_id: str) -> UsageEvent:
    return wait_until(lambda: UsageEvent.objects.filter(request_id=request_id).first(), 30, "the usage event")


def test_user_is_stored_on_the_usage_event(live):
    client = live.openai(live.new_key())
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          user="end-user-42")
    completion = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, user="end-user-43")
    anonymous = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert recorded(chat.id).user == "end-user-42"
    assert recorded(completion.id).user == "end-user-43"
    assert recorded(anonymous.id).user == ""
