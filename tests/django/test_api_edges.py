"""Unknown paths and wrong methods answer in OpenAI's shape on every method (CSRF checks on, as a
browser-less client meets them in production: Django's test client turns them off by default)."""
import pytest
from django.test import Client

from tenants.services import create_api_key, create_tenant


@pytest.fixture
def strict_client() -> Client:
    return Client(enforce_csrf_checks=True)


def assert_openai_error(response, status: int, code: str) -> dict:
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


@pytest.mark.parametrize("method", ["get", "post", "put", "patch", "delete"])
@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/chat/completion", "/nothing-here", "/v2/models"])
def test_unknown_path_is_a_404_in_openai_shape_on_every_method(strict_client, method, path):
    body = {} if method == "get" else {"data": b"{}", "content_type": "application/json"}
    response = getattr(strict_client, method)(path, **body)
    error = assert_openai_error(response, 404, "unknown_url")
    assert error["message"] == f"Invalid URL ({method.upper()} {path})"


def test_dashboard_and_admin_keep_their_html_404(strict_client):
    assert strict_client.get("/dashboard/no-such-page/").status_code == 404
    assert strict_client.get("/dashboard/no-such-page/")["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("method,path,allow", [
    ("get", "/v1/completions", "POST, OPTIONS"),
    ("get", "/v1/chat/completions", "POST, OPTIONS"),
    ("put", "/v1/chat/completions", "POST, OPTIONS"),
    ("delete", "/v1/models", "GET, HEAD, OPTIONS"),
    ("post", "/v1/models/some-model", "GET, HEAD, OPTIONS"),
    ("patch", "/v1/files", "POST, OPTIONS"),
    ("post", "/metrics", "GET, HEAD, OPTIONS"),
])
def test_wrong_method_is_a_405_with_allow_before_authentication(strict_client, method, path, allow):
    response = getattr(strict_client, method)(path)
    assert_openai_error(response, 405, "method_not_allowed")
    assert response["Allow"] == allow


def test_wrong_method_with_a_key_is_the_same_405(strict_client, db):
    _, key = create_api_key(tenant=create_tenant(name="edges"))
    response = strict_client.get("/v1/completions", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert_openai_error(response, 405, "method_not_allowed")
    assert response["Allow"] == "POST, OPTIONS"


def test_allowed_methods_still_reach_the_view(strict_client):
    assert strict_client.post("/v1/chat/completions", data=b"{}", content_type="application/json").status_code == 401
    assert strict_client.get("/v1/openapi.json").status_code == 200
    assert strict_client.head("/health").status_code == 200
