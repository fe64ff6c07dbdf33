"""vLLM's `POST /tokenize` and `POST /detokenize` (served at the root, as vLLM serves them): thin views."""
from __future__ import annotations

from adrf.views import APIView
from django.http import JsonResponse
from drf_spectacular.utils import OpenApiResponse, PolymorphicProxySerializer, extend_schema

from inference import services, tokenize_services
from inference.authentication import ApiKeyAuthentication
from inference.serializers import validated
from inference.tokenize_serializers import (
    DetokenizeSerializer, TokenizeChatSerializer, TokenizeTextSerializer, tokenize_serializer,
)
from inference.tokenizing import off_loop

TOKENIZE_REQUEST = PolymorphicProxySerializer(component_name="TokenizeRequest", resource_type_field_name=None,
                                              serializers=[TokenizeTextSerializer, TokenizeChatSerializer])


class TokenizeApi(APIView):
    authentication_classes = [ApiKeyAuthentication]

    @extend_schema(summary="Token ids of a text prompt or of chat messages (vLLM)", request=TOKENIZE_REQUEST,
                   responses=OpenApiResponse(description='`{"count", "max_model_len", "tokens"}`'),
                   operation_id="tokenize")
    async def post(self, request):
        async with services.refusal_counted(request.auth):
            data = await off_loop(validated, tokenize_serializer(request.data), request.data)
            return JsonResponse(await tokenize_services.tokenize(api_key=request.auth, data=data))


class DetokenizeApi(APIView):
    authentication_classes = [ApiKeyAuthentication]

    @extend_schema(summary="Text of token ids (vLLM)", request=DetokenizeSerializer,
                   responses=OpenApiResponse(description='`{"prompt"}`'), operation_id="detokenize")
    async def post(self, request):
        async with services.refusal_counted(request.auth):
            data = await off_loop(validated, DetokenizeSerializer, request.data)
            return JsonResponse(await tokenize_services.detokenize(api_key=request.auth, data=data))
