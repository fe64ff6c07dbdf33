"""LoRA over the linear layers of our models: base output plus expand(shrink(x)) for the tokens that
use an adapter, all adapters of a step in one batched pair of kernels (Punica's SGMV, vLLM's
Triton LoRA ops; their plain-torch references on the CPU).

Each wrapped layer holds stacked device slot buffers, `lora_a [max_loras, num_slices * max_rank, in]`
and `lora_b [max_loras, out, max_rank]`, which the manager fills from its host cache. Under tensor
parallelism the adapter is cut like the layer: a column-parallel layer keeps A whole and the rows of
B this rank outputs; a row-parallel one keeps the columns of A it reads, and its partial LoRA product
joins the partial base product before the one all-reduce.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.distributed.layers import ColumnParallelLinear, RowParallelLinear
from engine.distributed.parallel_state import all_reduce, tp_rank
from engine.layers.linear import linear
from engine.lora.adapter import LoRALayerWeights
from kernels import triton_or_reference
from kernels.lora_mapping import LoRATokenMapping
from kernels.lora_ref import lora_expand_ref, lora_shrink_ref


# Steps of at most this many tokens (batch-1 and small-batch decoding, a short prompt's prefill) take
# every slot's shrink from the base GEMM's extra rows: re-reading each token's slot B in the per-token
# expand costs less than the shrink launch it saves. Larger steps run the shrink and tiled expand.
STACKED_MAX_TOKENS = 32


class LoRAContext:
    """What every LoRA layer of a model reads each step: the token -> slot mapping, and whether any
    token uses an adapter (an eager step without one skips the LoRA work; a CUDA graph always runs it,
    and tokens without an adapter exit at once)."""

    def __init__(self, mapping: LoRATokenMapping) -> None:
        self.mapping = mapping
        self.active = False


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, full_slice_sizes: tuple[int, ...], context: LoRAContext,
                 max_loras: int, max_rank: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.max_rank = max_rank
        self.row_parallel = isinstance(base_layer, RowParallelLinear)
        if isinstance(base_layer, ColumnParallelLinear):  # this rank's rows of each slice
            self.slice_rows = list(base_layer.shard_rows.values())
        else:
            self.slice_rows = [(0, size) for size in full_slice_sizes]
        starts = [0]
        for _, size in self.slice_rows:
            starts.append(starts[-1] + size)
        self.slice_starts = tuple(starts)
        weight = base_layer.weight
        factory = dict(dtype=weight.dtype, device=weight.device)
        # The slots' A matrices are rows below the base weight's, in one tensor: a small step (batch-1
        # decoding) runs one GEMM for the base output and every slot's shrink, where the shrink
        # kernel (and the clear before it) would each be a launch per projection. The base layer's
        # weight is the first rows, so every larger step's GEMM is what it was.
        num_rows, rank_width = weight.shape[0], len(self.slice_rows) * max_rank
        stacked = torch.empty(num_rows + max_loras * rank_width, weight.shape[1], **factory)
        stacked[:num_rows].copy_(weight.data)
        stacked[num_rows:].zero_()
        base_layer.weight = nn.Parameter(stacked[:num_rows], requires_grad=False)
        self.register_buffer("stacked_weight", stacked, persistent=False)
        self.register_buffer("lora_a", stacked[num_rows:].view(max_loras, rank_width, weight.shape[1]),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_loras, num_rows, max_rank, **factory), persistent=False)
        # The bias of the stacked GEMM: the base layer's, then zeros under the shrink's columns.
        self.stacked_bias = None
        if base_layer.bias is not None and not self.row_parallel:
            self.stacked_bias = torch.cat([base_layer.bias.data, torch.zeros(max_loras * rank_width, **factory)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.context.active and x.shape[0] <= STACKED_MAX_TOKENS:
            num_rows = base.weight.shape[0]
            stacked = linear(x, self.stacked_weight, self.stacked_bias)
            expand = triton_or_reference(x, "lora_expand", lora_expand_ref)
            expand(stacked[:, num_rows:], self.lora_b, self.context.mapping, self.slice_starts,
                   stacked[:, :num_rows], y_per_slot=True)
            out = stacked[:, :num_rows].contiguous()  # a copy only for more than one row
        else:
            out = linear(x, base.weight, None if self.row_parallel else base.bias)
            if self.context.active:
                self._add_lora(x, out)
        if self.row_parallel:  # the partial LoRA products are summed with the base ones
            out = all_reduce(out)
            if base.bias is not None:
                out = out + base.bias
        return out

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor) -> None:
        mapping = self.context.mapping
        shrunk = torch.empty(x.shape[0], self.lora_a.shape[1], dtype=torch.float32, device=x.device)
        triton_or_reference(x, "lora_shrink", lora_shrink_ref)(x, self.lora_a, mapping, shrunk)
        triton_or_reference(x, "lora_expand", lora_expand_ref)(shrunk, self.lora_b, mapping, self.slice_starts, out)

    def slot_image(self, weights: LoRALayerWeights | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This rank's slot contents for an adapter (host tensors, zero-padded to max_rank), or None
        when the adapter leaves this layer alone."""
        if weights is None:
            return None
        rank, dtype = self.max_rank, self.lora_a.dtype
        image_a = torch.zeros(self.lora_a.shape[1:], dtype=dtype)
        image_b = torch.zeros(self.lora_b.shape[1:], dtype=dtype)
        in_local = self.lora_a.shape[2]
        for index, (lora_a, lora_b) in enumerate(zip(weights.lora_a, weights.lora_b)):
            if lora_a is None:
                continue
            if self.row_parallel:
                lora_a = lora_a.narrow(1, tp_rank() * in_local, in_local)
            first_row, num_rows = self.slice_rows[index]
            image_a[index * rank:index * rank + lora_a.shape[0]] = lora_a
            rows = slice(self.slice_starts[index], self.slice_starts[index + 1])
            image_b[rows, :lora_b.shape[1]] = lora_b.narrow(0, first_row, num_rows)
        if self.lora_a.is_cuda:  # pinned, so slot copies queue on the stream without a host wait
            image_a, image_b = image_a.pin_memory(), image_b.pin_memory()
        return image_a, image_b

    def set_slot(self, slot: int, image: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Ordered on the stream after the steps already launched, so a step in flight still reads
        the slot's previous adapter."""
        if image is None:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
        else:
            self.lora_a[slot].copy_(image[0], non_blocking=True)
            self.lora_b[slot].copy_(image[1], non_blocking=True)


def wrap_lora_layers(model: nn.Module, module_specs: dict, context: LoRAContext, max_loras: int,
                     max_rank: int) -> dict[str, LoRALinear]:
    """Swap every decoder layer's projections for LoRA layers (after the weights are loaded: the
    base weights move under `base_layer`); returns them by their module name."""
    wrapped = {}
    for index, layer in enumerate(model.model.layers):
        for path in module_specs:  # a mixture of experts: its attention's (engine/lora/moe_layer.py does its experts)
            parent_name, leaf = path.split(".")
            parent = getattr(layer, parent_name)
            lora_layer = LoRALinear(getattr(parent, leaf), module_specs[path].slice_sizes, context, max_loras,
                                    max_rank)
            setattr(parent, leaf, lora_layer)
            wrapped[f"model.layers.{index}.{path}"] = lora_layer
    return wrapped
