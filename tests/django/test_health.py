"""GET /health and the Redis selector behind it (Redis runs: scripts/test starts one)."""
from inference.selectors import redis_is_reachable


def test_health_reports_ok_and_redis(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"status": "ok", "redis": True, "engines": {}}


def test_health_is_get_only(client):
    assert client.post("/health").status_code == 405


def test_unreachable_redis_is_false_not_an_error():
    assert redis_is_reachable(url="redis://127.0.0.1:1/0", timeout_s=0.2) is False
