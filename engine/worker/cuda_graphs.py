"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step launches hundreds of small kernels; launched one by one from Python they take longer
than the GPU needs to run them. Captured once at start-up, a whole forward pass replays as one
launch. The graphs read the runner's persistent device input buffers, so a step only copies its
inputs in; a batch between two buckets is padded up to the larger (padded rows write to the null
block, and their outputs are ignored). Steps with prefills run eagerly.

Graphs go up to max_num_seqs (1024 on CUDA by default): an eager decode step of 1,000 sequences
spends ~15 ms of host time launching ~450 kernels, more than async scheduling can hide.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from engine.distributed import parallel_state
from engine.layers.attention import set_forward_context
from engine.worker.input_buffers import InputBuffers

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 1024


def capture_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's buckets, 1, 2, 4, then every multiple of 8 up to 256; then coarser (every 16 up to 512,
    every 32 up to 1024: padding stays under 7% and capture time in check), up to max_num_seqs."""
    limit = min(max_num_seqs, MAX_CAPTURE_SIZE)
    buckets = (1, 2, 4, *range(8, 257, 8), *range(272, 513, 16), *range(544, 1025, 32))
    sizes = [size for size in buckets if size <= limit]
    return sizes if sizes[-1] == limit else [*sizes, limit]


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, buffers: InputBuffers, max_num_seqs: int,
                 before_capture=None) -> None:
        self.model = model
        self.before_capture = before_capture  # called with each graph's size first (LoRA fills its mapping)
        self.buffers = buffers
        self.sizes = capture_sizes(max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # each graph's hidden states, rewritten by every replay

    def padded_size(self, num_seqs: int) -> int | None:
        """The smallest bucket that holds `num_seqs` decodes, or None (run eagerly)."""
        index = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[index] if index < len(self.sizes) else None

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, into one memory pool: smaller graphs reuse the larger ones' scratch memory."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            inputs = self.buffers.prepare([], [], padded_seqs=size)
            if self.before_capture is not None:
                self.before_capture(size)
            with set_forward_context(inputs.metadata):
                self.model(inputs.input_ids, inputs.positions)  # compiles the Triton kernels outside capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self.model(inputs.input_ids, inputs.positions)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        if parallel_state.tp_world_size() > 1:  # the graphs hold NCCL work: free them before the group
            parallel_state.call_before_destroy(self.release)
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1fs", len(self.sizes), self.sizes[0],
                    self.sizes[-1], time.perf_counter() - started)

    def release(self) -> None:
        """Free the graphs; later steps run eagerly. Destroying a process group whose collectives a
        live graph captured hangs (pytorch/pytorch#115388), so this runs first."""
        torch.cuda.synchronize()
        for graph in self.graphs.values():
            graph.reset()
        self.graphs, self.outputs, self.sizes = {}, {}, []

    def replay(self, size: int) -> torch.Tensor:
        """The hidden states of the step whose inputs were just prepared with `padded_seqs=size`."""
        self.graphs[size].replay()
        return self.outputs[size]
