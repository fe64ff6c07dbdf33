"""This process's place in the tensor-parallel group, and the collectives the sharded layers use.

One group per process: torch.distributed's default group, gloo on the CPU and NCCL on CUDA. The
collectives are plain torch.distributed calls, so on CUDA they are NCCL kernels that a CUDA graph
captures like any other launch.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

# A backstop only: a dead peer breaks gloo's connections at once, and rank 0 watches its workers.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)

_rank, _world_size = 0, 1
_threads_before: int | None = None
_before_destroy: list[weakref.WeakMethod] = []
_lost_nccl_peer = False  # an NCCL group lost a rank: this process cannot tear it down or start another


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_tensor_parallel(rank: int, world_size: int, port: int, device: str) -> None:
    """Join the group of `world_size` ranks that rendezvous on 127.0.0.1:`port`."""
    global _rank, _world_size, _threads_before
    if _lost_nccl_peer:
        raise RuntimeError("a tensor-parallel engine in this process lost a GPU worker, and NCCL cannot start "
                           "another group here: start the engine in a new process")
    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel engine already runs in this process; shut it down first")
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.set_device(rank)
    else:  # the ranks share the cores; more threads than cores make every collective wait on a spinner
        _threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, _threads_before // world_size))
    dist.init_process_group("nccl" if on_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    _rank, _world_size = rank, world_size


def abort_collectives() -> None:
    """Make collectives that wait on a dead peer fail now. NCCL only (gloo fails by itself once the
    peer's socket closes): the abort frees the kernels spinning on the peer, but the call itself may
    never return (seen on H200s, torch 2.11), so it runs on a thread nobody waits for, and the group
    is abandoned rather than destroyed."""
    global _lost_nccl_peer
    if dist.is_initialized() and dist.get_backend() == "nccl" and not _lost_nccl_peer:
        _lost_nccl_peer = True
        threading.Thread(target=dist.distributed_c10d._abort_process_group, name="nccl-abort", daemon=True).start()


def _exit_if_nccl_peer_lost() -> None:
    """At interpreter exit, NCCL's state for a group that lost a rank cannot be torn down: its C++
    destructor calls std::terminate (seen on H200s, torch 2.11). Leave before it runs, with status 1,
    since this process's engine died. Registered at import, so the engine's own exit hooks run first."""
    if _lost_nccl_peer:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


atexit.register(_exit_if_nccl_peer_lost)


def call_before_destroy(method) -> None:
    """Have `method` (a bound method, held weakly) run before this process leaves the group."""
    _before_destroy.append(weakref.WeakMethod(method))


def destroy_tensor_parallel() -> None:
    global _rank, _world_size, _threads_before
    if _lost_nccl_peer:  # the device may be stuck in an aborted collective: touch neither it nor the group
        _before_destroy.clear()
    while _before_destroy:
        if (method := _before_destroy.pop()()) is not None:
            method()
    if dist.is_initialized() and not _lost_nccl_peer:
        dist.destroy_process_group()
    if _threads_before is not None:
        torch.set_num_threads(_threads_before)
        _threads_before = None
    _rank, _world_size = 0, 1


def tp_rank() -> int:
    return _rank


def tp_world_size() -> int:
    return _world_size


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _world_size > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def broadcast_from_driver(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` on every rank (in place): the tokens only rank 0 samples."""
    if _world_size > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def all_gather_last_dim(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor`, concatenated along the last dimension in rank order."""
    if _world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(_world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=-1)
