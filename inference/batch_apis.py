"""The Batch API's endpoints (`/v1/files`, `/v1/batches`): thin async views over batch services/selectors.

Objects have exactly OpenAI's shape, so the official SDK's `files` and `batches` calls work. Every
lookup is scoped to the caller's tenant: another tenant's id is a 404, as if it did not exist.
"""
from __future__ import annotations

import uuid

from adrf.views import APIView
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpResponse, JsonResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import MultiPartParser

from inference import batch_selectors, batch_services
from inference.authentication import ApiKeyAuthentication
from inference.batch_input import BATCH_ENDPOINTS
from inference.engine_client import get_engine_client
from inference.errors import OpenAIError
from inference.fields import StrictCharField
from inference.models import Batch, File, FilePurpose
from inference.serializers import StrictSerializer, validated
from inference.upload_rate import take_upload

OPENAI_OBJECT = OpenApiResponse(description="OpenAI's file or batch object")


class FileUploadSerializer(StrictSerializer):
    file = serializers.FileField(allow_empty_file=False)
    purpose = serializers.ChoiceField(choices=[FilePurpose.BATCH], error_messages={
        "invalid_choice": "Only purpose 'batch' is supported by this server."})


class BatchCreateSerializer(StrictSerializer):
    input_file_id = StrictCharField(max_length=40)
    endpoint = serializers.ChoiceField(choices=BATCH_ENDPOINTS)
    completion_window = serializers.ChoiceField(choices=list(batch_services.COMPLETION_WINDOWS))
    metadata = serializers.DictField(child=StrictCharField(max_length=512, allow_blank=True), required=False,
                                     allow_null=True)

    def validate_metadata(self, value):
        if value and (len(value) > 16 or any(len(key) > 64 for key in value)):
            raise serializers.ValidationError("At most 16 keys of at most 64 characters.")
        return value


class BatchListSerializer(StrictSerializer):
    after = StrictCharField(required=False, max_length=40)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=100, default=20)


class FileListCreateApi(APIView):
    authentication_classes = [ApiKeyAuthentication]
    parser_classes = [MultiPartParser]

    @extend_schema(summary="Upload a JSONL batch input file", request={"multipart/form-data": FileUploadSerializer},
                   responses=OPENAI_OBJECT, operation_id="create_file")
    async def post(self, request):
        data = validated(FileUploadSerializer, {name: request.data.get(name) for name in request.data})
        upload = data["file"]
        if upload.size > settings.BATCH_FILE_MAX_BYTES:
            raise OpenAIError(f"The file is {upload.size} bytes; at most {settings.BATCH_FILE_MAX_BYTES} are allowed.",
                              status=413, param="file", code="file_too_large")
        await take_upload(redis=get_engine_client().redis, tenant=request.auth.tenant, upload_id=uuid.uuid4().hex)
        content = upload.read()
        try:
            content.decode("utf-8")
        except UnicodeDecodeError:
            raise OpenAIError("The file must be UTF-8 encoded JSONL.", param="file", code="invalid_file") from None
        file = await sync_to_async(batch_services.upload_file)(
            tenant=request.auth.tenant, purpose=data["purpose"], filename=upload.name, content=content)
        return JsonResponse(file_object(file))


class FileDetailApi(APIView):
    authentication_classes = [ApiKeyAuthentication]

    @extend_schema(summary="One file", responses=OPENAI_OBJECT, operation_id="retrieve_file")
    async def get(self, request, file_id: str):
        return JsonResponse(file_object(await _file(request, file_id)))

    @extend_schema(summary="Delete a file", responses=OPENAI_OBJECT, operation_id="delete_file")
    async def delete(self, request, file_id: str):
        await sync_to_async(batch_services.delete_file)(file=await _file(request, file_id))
        return JsonResponse({"id": file_id, "object": "file", "deleted": True})


class AnyAccept(BaseContentNegotiation):
    """The SDK asks for `application/binary`; the content is what it is, so Accept is not negotiated."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class FileContentApi(APIView):
    authentication_classes = [ApiKeyAuthentication]
    content_negotiation_class = AnyAccept

    @extend_schema(summary="A file's content", responses=OPENAI_OBJECT, operation_id="retrieve_file_content")
    async def get(self, request, file_id: str):
        content = await sync_to_async(batch_selectors.get_file_content)(tenant=request.auth.tenant, file_id=file_id)
        if content is None:
            raise _no_such("file", file_id)
        return HttpResponse(content, content_type="application/jsonl")


class BatchListCreateApi(APIView):
    authentication_classes = [ApiKeyAuthentication]

    @extend_schema(summary="Create a batch", request=BatchCreateSerializer, responses=OPENAI_OBJECT,
                   operation_id="create_batch")
    async def post(self, request):
        data = validated(BatchCreateSerializer, request.data)
        input_file = await _file(request, data["input_file_id"], param="input_file_id")
        if input_file.purpose != FilePurpose.BATCH:
            raise OpenAIError("The input file must have purpose 'batch'.", param="input_file_id",
                              code="invalid_input_file")
        batch = await sync_to_async(batch_services.create_batch)(
            api_key=request.auth, input_file=input_file, endpoint=data["endpoint"],
            completion_window=data["completion_window"], metadata=data.get("metadata"))
        return JsonResponse(batch_object(batch))

    @extend_schema(summary="The key's tenant's batches, newest first", parameters=[BatchListSerializer],
                   responses=OPENAI_OBJECT, operation_id="list_batches")
    async def get(self, request):
        query = validated(BatchListSerializer, request.query_params.dict())
        batches, has_more = await sync_to_async(batch_selectors.list_batches)(
            tenant=request.auth.tenant, after=query.get("after"), limit=query["limit"])
        data = [batch_object(batch) for batch in batches]
        return JsonResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": has_more})


class BatchDetailApi(APIView):
    authentication_classes = [ApiKeyAuthentication]

    @extend_schema(summary="One batch", responses=OPENAI_OBJECT, operation_id="retrieve_batch")
    async def get(self, request, batch_id: str):
        return JsonResponse(batch_object(await _batch(request, batch_id)))


class BatchCancelApi(APIView):
    authentication_classes = [ApiKeyAuthentication]

    @extend_schema(summary="Cancel a batch", request=None, responses=OPENAI_OBJECT, operation_id="cancel_batch")
    async def post(self, request, batch_id: str):
        batch = await sync_to_async(batch_services.cancel_batch)(batch=await _batch(request, batch_id))
        return JsonResponse(batch_object(batch))


async def _file(request, file_id: str, param: str | None = None) -> File:
    file = await sync_to_async(batch_selectors.get_file)(tenant=request.auth.tenant, file_id=file_id)
    if file is None:
        raise _no_such("file", file_id, param)
    return file


async def _batch(request, batch_id: str) -> Batch:
    batch = await sync_to_async(batch_selectors.get_batch)(tenant=request.auth.tenant, batch_id=batch_id)
    if batch is None:
        raise _no_such("batch", batch_id)
    return batch


def _no_such(kind: str, object_id: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(f"No such {kind}: {object_id}", status=404, param=param, code=f"{kind}_not_found")


def _timestamp(value) -> int | None:
    return None if value is None else int(value.timestamp())


def file_object(file: File) -> dict:
    purpose = FilePurpose.BATCH_OUTPUT if file.purpose == FilePurpose.BATCH_ERROR else file.purpose  # OpenAI's name
    return {"id": file.id, "object": "file", "bytes": file.bytes, "created_at": _timestamp(file.created_at),
            "expires_at": _timestamp(file.expires_at), "filename": file.filename, "purpose": str(purpose), "status": "processed",
            "status_details": None}


def batch_object(batch: Batch) -> dict:
    errors = {"object": "list", "data": batch.errors} if batch.errors else None
    timestamps = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                  "expired_at", "cancelling_at", "cancelled_at")
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "errors": errors,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": batch.status, "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
        **{name: _timestamp(getattr(batch, name)) for name in timestamps},
        "request_counts": {"total": batch.total_requests, "completed": batch.completed_requests,
                           "failed": batch.failed_requests},
        "usage": {"input_tokens": batch.prompt_tokens, "input_tokens_details": {"cached_tokens": batch.cached_tokens},
                  "output_tokens": batch.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": batch.prompt_tokens + batch.completion_tokens},
        "metadata": batch.metadata,
    }
