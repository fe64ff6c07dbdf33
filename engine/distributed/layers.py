"""Sharded layers: each rank keeps a slice of a weight and the collective that makes it whole.

Column-parallel linears keep rows of the weight (output features) and need no communication;
row-parallel ones keep columns (input features) and sum their partial outputs with an all-reduce,
so each attention block and MLP costs one all-reduce, as in Megatron-LM. The vocabulary is split
by rows too: the embedding all-reduces (each token's row lives on one rank), the LM head's logits
are all-gathered (see ModelRunner.compute_logits).

Every parameter carries `tp_slice(tensor, shard)`, which cuts this rank's part out of one full
checkpoint tensor; the model's `load_weights` calls it, so a rank never holds more of the
checkpoint than the one tensor being loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed.parallel_state import all_reduce, tp_rank, tp_world_size
from engine.layers.linear import Linear, linear


class ColumnParallelLinear(Linear):
    """`shard_rows` maps each checkpoint shard (q/k/v, gate/up, or None for an unmerged weight) to
    the (first row, number of rows) of the full tensor this rank keeps; the kept rows of the merged
    shards are stacked in the order given."""

    def __init__(self, in_features: int, shard_rows: dict, bias: bool, **factory) -> None:
        super().__init__(in_features, sum(size for _, size in shard_rows.values()), bias=bias, **factory)
        self.shard_rows = shard_rows
        for param in self.parameters():
            param.tp_slice = self._slice

    def _slice(self, tensor: torch.Tensor, shard) -> torch.Tensor:
        start, size = self.shard_rows[shard]
        return tensor.narrow(0, start, size)


class RowParallelLinear(Linear):
    """Each rank holds a slice of the input columns; the partial products are summed across ranks.
    A bias (whole on every rank) is added once, after the sum. With `reduce_results=False` the
    partial product is returned for the caller to sum with others (an MoE block's shared expert)."""

    def __init__(self, in_features_per_rank: int, out_features: int, bias: bool = False, reduce_results: bool = True,
                 **factory) -> None:
        super().__init__(in_features_per_rank, out_features, bias=bias, **factory)
        assert reduce_results or not bias, "a bias belongs after the sum"
        self.reduce_results = reduce_results
        self.weight.tp_slice = self._slice

    def _slice(self, tensor: torch.Tensor, shard) -> torch.Tensor:
        return tensor.narrow(1, tp_rank() * self.in_features, self.in_features)

    def forward(self, x: torch.Tensor, silu_gated: bool = False) -> torch.Tensor:
        out = linear(x, self.weight, silu_gated=silu_gated)
        if not self.reduce_results:
            return out
        out = all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * n, (rank + 1) * n) of the vocabulary, padded so every rank holds n rows; also the
    weight of a (tied or untied) vocabulary-parallel LM head, whose padded logits are cut off after
    the all-gather."""

    def __init__(self, vocab_size: int, hidden_size: int, **factory) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.num_rows = -(-vocab_size // tp_world_size())
        self.first_row = tp_rank() * self.num_rows
        self.weight = nn.Parameter(torch.empty(self.num_rows, hidden_size, **factory))
        self.weight.tp_slice = self._slice

    def _slice(self, tensor: torch.Tensor, shard) -> torch.Tensor:
        rows = tensor[self.first_row:self.first_row + self.num_rows]
        return F.pad(rows, (0, 0, 0, self.num_rows - rows.shape[0]))  # the padding rows are zeros

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.first_row
        elsewhere = (local < 0) | (local >= self.num_rows)
        embeddings = F.embedding(local.masked_fill(elsewhere, 0), self.weight)
        return all_reduce(embeddings.masked_fill_(elsewhere.unsqueeze(-1), 0))


class ParallelRMSNorm(nn.Module):
    """RMSNorm over features split across ranks (OLMo 2's q/k norms span every head): the sum of
    squares is all-reduced, so each rank divides by the whole vector's RMS. `replicas` ranks hold each
    slice (KV heads replicated when fewer than ranks), so that sum counts every slice `replicas` times."""

    def __init__(self, rows: tuple[int, int], full_size: int, eps: float, replicas: int = 1, **factory) -> None:
        super().__init__()
        self.rows, self.eps, self.denominator = rows, eps, full_size * replicas
        self.weight = nn.Parameter(torch.empty(rows[1], **factory))
        self.weight.tp_slice = self._slice

    def _slice(self, tensor: torch.Tensor, shard) -> torch.Tensor:
        return tensor.narrow(0, *self.rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        sum_of_squares = all_reduce(x32.pow(2).sum(-1, keepdim=True))
        return self.weight * (x32 * torch.rsqrt(sum_of_squares / self.denominator + self.eps)).to(x.dtype)
