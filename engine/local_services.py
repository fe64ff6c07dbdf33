"""Starting local processes and services, for the benchmarks that launch a stack and for the tests:
a free port, a child tied to its parent's life, whether a Redis answers. No torch, no Django."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import socket
import sys

import redis

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None


def die_with_parent() -> None:
    """A Popen preexec_fn: the child gets SIGKILL when its parent dies (even by SIGKILL), so no
    engine or server outlives a killed run."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.ConnectionError:
        return False
