"""OpenAI's `user` field (the caller's end user) is kept on the usage event, through the Redis buffer."""
from asgiref.sync import async_to_sync

from tenants.models import UsageEvent
from tenants.services import usage_event
from tenants.usage_buffer import buffer_usage, flush_usage
from tests.django.admission_testing import async_redis_client, key_prefix, make_api_key  # noqa: F401
from tests.django.test_usage_buffer import plain_redis


def buffer_and_flush(key_prefix, event) -> UsageEvent:
    async def append():
        async with async_redis_client() as client:
            await buffer_usage(redis=client, key_prefix=key_prefix, event=event)

    async_to_sync(append)()
    assert flush_usage(redis=plain_redis(), key_prefix=key_prefix) == 1
    return UsageEvent.objects.get(request_id=event.request_id)


def test_the_user_survives_buffer_and_flush(db, key_prefix):
    api_key, user = make_api_key(), "end-user-\u00e9" + "x" * 245  # OpenAI's 256 characters, not ASCII
    event = usage_event(api_key=api_key, request_id="with-user", model="m", endpoint="chat.completions",
                        prompt_tokens=1, completion_tokens=1, user=user)
    assert buffer_and_flush(key_prefix, event).user == user


def test_no_user_is_blank(db, key_prefix):
    event = usage_event(api_key=make_api_key(), request_id="no-user", model="m", endpoint="completions",
                        prompt_tokens=1, completion_tokens=1)
    assert buffer_and_flush(key_prefix, event).user == ""
