"""Files cannot hurt other tenants: a storage cap and an upload rate per tenant, and files expire.
Django's test client on the real ASGI views, real Redis and the test database (no engine needed)."""
from __future__ import annotations

import json
import uuid
from datetime import timedelta

from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import override_settings
from django.utils import timezone

from inference.models import File
from inference.tasks import delete_expired_files
from tenants.services import create_api_key, create_tenant


def new_key() -> str:
    tenant = create_tenant(name=f"files-{uuid.uuid4().hex[:10]}")
    return create_api_key(tenant=tenant)[1]


def upload(client, key: str, size: int = 300):
    line = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"pad": ""}})
    content = (line[:-2] + "x" * (size - len(line) - 1) + "}}\n").encode()
    assert len(content) == size
    return client.post("/v1/files", {"file": SimpleUploadedFile("in.jsonl", content), "purpose": "batch"},
                       HTTP_AUTHORIZATION=f"Bearer {key}")


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@override_settings(FILES_MAX_BYTES_PER_TENANT=1000)
def test_storage_is_capped_per_tenant(client):
    key, other = new_key(), new_key()
    first = upload(client, key, 600)
    assert first.status_code == 200
    refused = upload(client, key, 600)
    assert refused.status_code == 400 and error_of(refused)["code"] == "storage_limit_exceeded"
    assert "1000 bytes" in error_of(refused)["message"]
    assert upload(client, other, 600).status_code == 200  # another tenant's storage is its own
    assert client.delete(f"/v1/files/{first.json()['id']}", HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 200
    assert upload(client, key, 600).status_code == 200  # deleting frees the space


@override_settings(FILES_MAX_UPLOADS_PER_HOUR=2)
def test_uploads_per_hour_are_capped_per_tenant(client):
    key = new_key()
    for _ in range(2):
        made = upload(client, key)
        assert made.status_code == 200
        client.delete(f"/v1/files/{made.json()['id']}", HTTP_AUTHORIZATION=f"Bearer {key}")  # deleting does not help
    refused = upload(client, key)
    assert refused.status_code == 429 and error_of(refused)["code"] == "rate_limit_exceeded"
    assert 3000 <= int(refused["Retry-After"]) <= 3600
    assert upload(client, new_key()).status_code == 200


@override_settings(FILES_RETENTION_DAYS=7)
def test_files_expire_then_answer_404_and_are_deleted(client):
    key = new_key()
    made = upload(client, key).json()
    assert abs(made["expires_at"] - made["created_at"] - 7 * 86400) <= 2
    auth = {"HTTP_AUTHORIZATION": f"Bearer {key}"}
    assert client.get(f"/v1/files/{made['id']}", **auth).status_code == 200
    File.objects.filter(pk=made["id"]).update(expires_at=timezone.now() - timedelta(seconds=1))
    for response in (client.get(f"/v1/files/{made['id']}", **auth), client.get(f"/v1/files/{made['id']}/content",
                                                                              **auth),
                     client.post("/v1/batches", {"input_file_id": made["id"], "endpoint": "/v1/completions",
                                                 "completion_window": "24h"}, content_type="application/json",
                                 **auth)):
        assert response.status_code == 404 and error_of(response)["code"] == "file_not_found"
    assert delete_expired_files() >= 1
    assert not File.objects.filter(pk=made["id"]).exists()


def test_unexpired_files_are_kept(client):
    key = new_key()
    made = upload(client, key).json()
    delete_expired_files()
    assert File.objects.filter(pk=made["id"]).exists()
