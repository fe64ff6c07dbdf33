"""The flat inputs of one step, built in persistent host buffers and copied to persistent device ones.

On CUDA the host buffers are pinned, so `copy_(non_blocking=True)` queues each copy behind the
previous step's work instead of waiting for it; the device buffers never move, so the CUDA graphs
captured over them read every later step's inputs. On the CPU the two are the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.layers.attention import AttentionMetadata
from engine.worker.request_states import CachedRequestState

NULL_SLOT = 0  # slot 0 of the null block 0, which no request owns: padded rows write there


class StagedBuffer:
    """One host tensor (with a numpy view to fill it cheaply) and its device twin. A host buffer must
    not be refilled before the copies queued from it ran: its owner keeps a CopyFence."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        on_cuda = device.type == "cuda"
        self.host = torch.zeros(shape, dtype=dtype, pin_memory=on_cuda)
        self.np = self.host.numpy()
        self.device = torch.zeros(shape, dtype=dtype, device=device) if on_cuda else self.host

    def copy(self, rows: int) -> torch.Tensor:
        """The first `rows` rows on the device, copied without waiting for the device."""
        if self.device is not self.host:
            self.device[:rows].copy_(self.host[:rows], non_blocking=True)
        return self.device[:rows]

    def copy_per_group(self, rows: int) -> torch.Tensor:
        """The first `rows` rows of each KV cache group (the first dimension): one contiguous copy each."""
        if self.device is not self.host:
            for group in range(self.host.shape[0]):
                self.device[group, :rows].copy_(self.host[group, :rows], non_blocking=True)
        return self.device[:, :rows]


class CopyFence:
    """Marks where the copies queued from pinned host buffers end, so that refilling the buffers can wait
    until those copies ran (usually long done: a step's copies precede its forward). A no-op off CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event() if device.type == "cuda" else None

    def wait(self) -> None:
        if self.event is not None and not self.event.query():
            self.event.synchronize()

    def mark(self) -> None:
        if self.event is not None:
            self.event.record()


@dataclass
class StepInputs:
    metadata: AttentionMetadata
    input_ids: torch.Tensor
    positions: torch.Tensor
    sample_rows: torch.Tensor  # rows of the hidden states whose next token is sampled
    # Token rows whose input is not on the host yet (the previous step sampled it), and the request
    # each belongs to: the runner fills them from the device (async scheduling).
    unknown_token_rows: list[int]
    unknown_token_requests: list[str]


class InputBuffers:
    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device, num_kv_groups: int = 1) -> None:
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.input_ids = StagedBuffer((max_num_tokens,), torch.long, device)
        self.positions = StagedBuffer((max_num_tokens,), torch.long, device)
        # A slot and a block-table row per KV cache group (engine/core/kv_cache_groups.py).
        self.slot_mapping = StagedBuffer((num_kv_groups, max_num_tokens), torch.long, device)
        self.seq_lens = StagedBuffer((max_num_seqs,), torch.int32, device)
        self.block_tables = StagedBuffer((num_kv_groups, max_num_seqs, -(-max_model_len // block_size)),
                                         torch.int32, device)
        # Several rows per request when speculating.
        self.sample_rows = StagedBuffer((max_num_tokens,), torch.long, device)
        # Per block-table row: (request state, blocks written in each group). A state only gains blocks
        # (a preempted request comes back as a new state), so while it keeps its row a step writes
        # the new ones.
        self.row_owners: list[tuple[CachedRequestState, int] | None] = [None] * max_num_seqs
        self.block_table_writes = 0  # rows (re)written, counted for tests
        # The pinned buffers must not be refilled while the last step's copies may still read them.
        self.copied = CopyFence(device)

    def prepare(self, batch: list[tuple[CachedRequestState, int]], sample_rows: list[int],
                padded_seqs: int | None = None) -> StepInputs:
        """Fill and copy the inputs of `batch` (decodes first). `padded_seqs` pads an all-decode batch
        with dummy decodes up to a CUDA graph's size and sizes the decode launch for any length."""
        self.copied.wait()
        ids, positions, seq_lens, tables = self.input_ids.np, self.positions.np, self.seq_lens.np, self.block_tables.np
        query_start_loc = [0]
        num_decodes = 0
        unknown_rows, unknown_requests = [], []
        for row, (state, num_new) in enumerate(batch):
            start, token = state.num_computed_tokens, query_start_loc[-1]
            known = min(num_new, len(state.all_token_ids) - start)
            if num_new == 1:
                num_decodes += 1
                positions[token] = start
            else:
                positions[token:token + num_new] = np.arange(start, start + num_new)
            if known == 1 == num_new:
                ids[token] = state.all_token_ids[start]
            elif known > 0:
                ids[token:token + known] = state.all_token_ids[start:start + known]
            if state.spec_token_ids:  # speculative decoding: the proposals follow the last known token
                ids[token + known:token + num_new] = state.spec_token_ids
            elif known < num_new:  # only a decode's one token can be in flight
                unknown_rows.append(token + num_new - 1)
                unknown_requests.append(state.request_id)
            block_ids, owner = state.block_ids, self.row_owners[row]
            written, num_blocks = (owner[1] if owner is not None and owner[0] is state else 0), len(block_ids[0])
            if written < num_blocks:  # every KV cache group lists as many blocks
                for group, blocks in enumerate(block_ids):
                    tables[group, row, written:num_blocks] = blocks[written:]
                self.row_owners[row] = (state, num_blocks)
                self.block_table_writes += 1
            seq_lens[row] = start + num_new
            query_start_loc.append(token + num_new)
        num_seqs, num_tokens = len(batch), query_start_loc[-1]
        rows = np.repeat(np.arange(num_seqs), np.diff(query_start_loc))
        pos = positions[:num_tokens]
        block_size = self.block_size
        self.slot_mapping.np[:, :num_tokens] = tables[:, rows, pos // block_size] * block_size + pos % block_size
        decode_max_seq_len = int(seq_lens[:num_decodes].max(initial=0))
        if padded_seqs is not None:
            self._pad_decodes(num_seqs, padded_seqs)
            query_start_loc.extend(range(num_seqs + 1, padded_seqs + 1))
            num_seqs = num_tokens = num_decodes = padded_seqs
            decode_max_seq_len = self.max_model_len
        self.sample_rows.np[:len(sample_rows)] = sample_rows
        metadata = AttentionMetadata(
            slot_mapping=self.slot_mapping.copy_per_group(num_tokens),
            block_tables=self.block_tables.copy_per_group(num_seqs),
            seq_lens=self.seq_lens.copy(num_seqs), num_decodes=num_decodes,
            decode_max_blocks=-(-decode_max_seq_len // self.block_size), decode_max_seq_len=decode_max_seq_len,
            seq_lens_cpu=seq_lens[:num_seqs].tolist(), query_start_loc_cpu=query_start_loc)
        inputs = StepInputs(metadata, self.input_ids.copy(num_tokens), self.positions.copy(num_tokens),
                            self.sample_rows.copy(len(sample_rows)), unknown_rows, unknown_requests)
        self.copied.mark()
        return inputs

    def _pad_decodes(self, first: int, end: int) -> None:
        """Rows first..end-1 become one-token decodes of token 0 at position 0 over the null block."""
        self.input_ids.np[first:end] = 0
        self.positions.np[first:end] = 0
        self.slot_mapping.np[:, first:end] = NULL_SLOT
        self.seq_lens.np[first:end] = 1
        self.block_tables.np[:, first:end, 0] = 0
        self.row_owners[first:end] = [None] * (end - first)
