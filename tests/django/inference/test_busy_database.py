"""The API without a free database connection: a call with a cached key needs none, and one that
waits for the pool in vain is a 503 with Retry-After in OpenAI's shape, never a 500."""
import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext
from psycopg_pool import PoolTimeout

from inference import consumers
from inference.errors import expected_error
from tenants.services import create_api_key, create_tenant

pytestmark = pytest.mark.usefixtures("db")


@pytest.fixture
def raw_key() -> str:
    return create_api_key(tenant=create_tenant(name="acme"))[1]


def pool_timeout() -> OperationalError:
    """What Django raises when psycopg's pool gives no connection in time."""
    error = OperationalError("couldn't get a connection after 30.00 sec")
    error.__cause__ = PoolTimeout(str(error))
    return error


def call_without_messages(client, raw_key):
    """A chat call that is authenticated, then refused (400) before it would need an engine."""
    return client.post("/v1/chat/completions", data={}, content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {raw_key}")


def test_a_call_with_a_cached_key_runs_no_query(client, raw_key):
    assert call_without_messages(client, raw_key).status_code == 400
    with CaptureQueriesContext(connection) as queries:
        assert call_without_messages(client, raw_key).status_code == 400
    assert len(queries) == 0


def test_a_pool_without_a_free_connection_is_a_503_to_retry(client, raw_key, monkeypatch):
    def no_free_connection():
        raise pool_timeout()

    with monkeypatch.context() as patch:
        patch.setattr(connection, "ensure_connection", no_free_connection)
        response = call_without_messages(client, raw_key)  # a new key: not cached, so read from the database
    assert response.status_code == 503 and response["Retry-After"] == "1"
    assert response.json() == {"error": {"message": "The service is busy; please retry.", "type": "server_error",
                                         "param": None, "code": "server_busy"}}


def test_a_websocket_is_told_to_retry(monkeypatch):
    def no_free_connection(raw_key):
        raise pool_timeout()

    async def connect():
        socket = WebsocketCommunicator(consumers.InferenceConsumer.as_asgi(), "/v1/ws",
                                       headers=[(b"authorization", b"Bearer sk-anything")])
        await socket.connect()
        frame, closed = await socket.receive_json_from(), await socket.receive_output()
        await socket.disconnect()
        return frame, closed

    monkeypatch.setattr(consumers, "authenticate", no_free_connection)
    frame, closed = async_to_sync(connect)()
    assert frame["error"]["code"] == "server_busy" and closed == {"type": "websocket.close", "code": 1013}


def test_only_a_busy_pool_is_a_503():
    assert expected_error(pool_timeout()).code == "server_busy"
    assert expected_error(OperationalError("no such table: tenants_apikey")) is None  # a bug stays a 500
