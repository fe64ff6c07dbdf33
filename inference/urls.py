"""URL routes of the inference app (the OpenAI-compatible API lives under /v1/)."""
from django.urls import path, re_path
from drf_spectacular.views import SpectacularAPIView

from inference.errors import not_found
from inference.apis import (
    ChatCompletionsApi, CompletionsApi, HealthApi, MetricsApi, ModelDetailApi, ModelListApi,
)
from inference.batch_apis import (
    BatchCancelApi, BatchDetailApi, BatchListCreateApi, FileContentApi, FileDetailApi, FileListCreateApi,
)

urlpatterns = [
    path("health", HealthApi.as_view(), name="health"),
    path("metrics", MetricsApi.as_view(), name="metrics"),
    path("v1/models", ModelListApi.as_view(), name="models"),
    path("v1/models/<path:model>", ModelDetailApi.as_view(), name="model-detail"),
    path("v1/completions", CompletionsApi.as_view(), name="completions"),
    path("v1/chat/completions", ChatCompletionsApi.as_view(), name="chat-completions"),
    path("v1/files", FileListCreateApi.as_view(), name="files"),
    path("v1/files/<str:file_id>", FileDetailApi.as_view(), name="file-detail"),
    path("v1/files/<str:file_id>/content", FileContentApi.as_view(), name="file-content"),
    path("v1/batches", BatchListCreateApi.as_view(), name="batches"),
    path("v1/batches/<str:batch_id>", BatchDetailApi.as_view(), name="batch-detail"),
    path("v1/batches/<str:batch_id>/cancel", BatchCancelApi.as_view(), name="batch-cancel"),
    path("v1/openapi.json", SpectacularAPIView.as_view(), name="openapi"),
    re_path(r"^v1/", not_found),
]
