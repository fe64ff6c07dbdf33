"""Tokenizing, chat-template rendering and validating large bodies on a small thread pool, not on the event loop.

One event loop serves every call of a web process: a large prompt tokenized on it (hundreds of
milliseconds for a long chat) would stall every other tenant's stream on that process. The pool
is bounded (TOKENIZER_THREADS) so a burst of large prompts queues here instead of taking every core.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=settings.TOKENIZER_THREADS, thread_name_prefix="tokenize")
    return _pool


async def off_loop(function, *args, **kwargs):
    """`function(*args, **kwargs)` in the tokenizer pool; its exceptions are raised here."""
    return await asyncio.get_running_loop().run_in_executor(_executor(), functools.partial(function, *args, **kwargs))
