"""URL routes of the inference app (the OpenAI-compatible API lives under /v1/)."""
from django.urls import path, re_path
from drf_spectacular.views import SpectacularAPIView

from inference.errors import not_found
from inference.method_guard import methods_first
from inference.apis import (
    ChatCompletionsApi, CompletionsApi, HealthApi, MetricsApi, ModelDetailApi, ModelListApi, ReadyApi,
)
from inference.tokenize_apis import DetokenizeApi, TokenizeApi
from inference.batch_apis import (
    BatchCancelApi, BatchDetailApi, BatchListCreateApi, FileContentApi, FileDetailApi, FileListCreateApi,
)

urlpatterns = [
    path("health", methods_first(HealthApi.as_view()), name="health"),
    path("ready", methods_first(ReadyApi.as_view()), name="ready"),
    path("metrics", methods_first(MetricsApi.as_view()), name="metrics"),
    path("tokenize", methods_first(TokenizeApi.as_view()), name="tokenize"),  # vLLM serves these at the root
    path("detokenize", methods_first(DetokenizeApi.as_view()), name="detokenize"),
    path("v1/models", methods_first(ModelListApi.as_view()), name="models"),
    path("v1/models/<path:model>", methods_first(ModelDetailApi.as_view()), name="model-detail"),
    path("v1/completions", methods_first(CompletionsApi.as_view()), name="completions"),
    path("v1/chat/completions", methods_first(ChatCompletionsApi.as_view()), name="chat-completions"),
    path("v1/files", methods_first(FileListCreateApi.as_view()), name="files"),
    path("v1/files/<str:file_id>", methods_first(FileDetailApi.as_view()), name="file-detail"),
    path("v1/files/<str:file_id>/content", methods_first(FileContentApi.as_view()), name="file-content"),
    path("v1/batches", methods_first(BatchListCreateApi.as_view()), name="batches"),
    path("v1/batches/<str:batch_id>", methods_first(BatchDetailApi.as_view()), name="batch-detail"),
    path("v1/batches/<str:batch_id>/cancel", methods_first(BatchCancelApi.as_view()), name="batch-cancel"),
    path("v1/openapi.json", methods_first(SpectacularAPIView.as_view()), name="openapi"),
    re_path(r"^v1/", not_found),
]
