"""The web process's EngineClient: one per event loop (its Redis connections belong to a loop)."""
from __future__ import annotations

import asyncio
import weakref

from django.conf import settings

from engine.service.client import EngineClient
from inference.prompt_tokenizer import PromptTokenizerCache

_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
prompt_tokenizers = PromptTokenizerCache()


def get_engine_client() -> EngineClient:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = EngineClient(settings.REDIS_URL, key_prefix=settings.ENGINE_KEY_PREFIX,
                              timeout_s=settings.ENGINE_TIMEOUT_S)
        _clients[loop] = client
    return client
