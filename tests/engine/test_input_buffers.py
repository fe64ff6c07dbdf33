"""InputBuffers: the flat inputs of a mixed step, and the padding a CUDA graph's batch gets."""

import torch

from engine.sampling_params import SamplingParams
from engine.worker.input_buffers import NULL_SLOT, InputBuffers
from engine.worker.request_states import CachedRequestState

BLOCK_SIZE = 4


def _buffers() -> InputBuffers:
    return InputBuffers(max_num_tokens=64, max_num_seqs=8, max_model_len=32, block_size=BLOCK_SIZE,
                        device=torch.device("cpu"))


def state(request_id: str, token_ids: list[int], num_computed: int, block_ids: list[int]) -> CachedRequestState:
    return CachedRequestState(request_id, token_ids, [], SamplingParams(), 0, (block_ids,), num_computed)


def test_mixed_step_is_flattened_decodes_first():
    decode = state("d", [11, 12, 13, 14, 15], 4, [7, 3])  # token 15 at position 4: the second block's first slot
    prefill = state("p", [21, 22, 23, 24, 25, 26], 1, [5, 9])  # a chunk of tokens 1..5
    inputs = _buffers().prepare([(decode, 1), (prefill, 5)], sample_rows=[0, 5])
    meta = inputs.metadata
    assert inputs.input_ids.tolist() == [15, 22, 23, 24, 25, 26]
    assert inputs.positions.tolist() == [4, 1, 2, 3, 4, 5]
    assert meta.slot_mapping[0].tolist() == [3 * 4, 5 * 4 + 1, 5 * 4 + 2, 5 * 4 + 3, 9 * 4, 9 * 4 + 1]
    assert meta.seq_lens.tolist() == meta.seq_lens_cpu == [5, 6]
    assert meta.query_start_loc_cpu == [0, 1, 6]
    assert meta.block_tables[0, :, :2].tolist() == [[7, 3], [5, 9]]
    assert (meta.num_decodes, meta.decode_max_seq_len, meta.decode_max_blocks) == (1, 5, 2)
    assert inputs.sample_rows.tolist() == [0, 5]
    assert inputs.unknown_token_rows == []


def test_a_decode_whose_token_is_in_flight_is_left_to_the_device():
    """Async scheduling: the token at the decode's position is not on the host yet."""
    waiting = state("w", [11, 12, 13], 3, [7])
    inputs = _buffers().prepare([(state("d", [5, 6], 1, [2]), 1), (waiting, 1)], sample_rows=[0, 1])
    assert inputs.input_ids.tolist()[0] == 6 and inputs.positions.tolist() == [1, 3]
    assert (inputs.unknown_token_rows, inputs.unknown_token_requests) == ([1], ["w"])


def test_decode_batch_is_padded_to_the_graph_size_over_the_null_block():
    buffers = _buffers()
    states = [state(str(i), list(range(1, 4 + i)), 2 + i, [i + 1, 7]) for i in range(3)]
    buffers.block_tables.np[:] = 6  # stale rows of earlier steps
    inputs = buffers.prepare([(s, 1) for s in states], [0, 1, 2], padded_seqs=8)
    meta = inputs.metadata
    assert inputs.input_ids.tolist() == [3, 4, 5] + [0] * 5
    assert inputs.positions.tolist() == [2, 3, 4] + [0] * 5
    assert meta.slot_mapping[0].tolist() == [1 * 4 + 2, 2 * 4 + 3, 7 * 4 + 0] + [NULL_SLOT] * 5
    assert meta.seq_lens.tolist() == meta.seq_lens_cpu == [3, 4, 5] + [1] * 5
    assert meta.query_start_loc_cpu == list(range(9))
    assert meta.block_tables[0, 3:, 0].tolist() == [0] * 5
    # A graph's launch fits any step: sized for max_model_len, not this step's lengths.
    assert (meta.num_decodes, meta.decode_max_seq_len, meta.decode_max_blocks) == (8, 32, 8)


def test_block_table_rows_are_written_only_for_new_blocks_or_a_new_request_state():
    """A row is rewritten only in part while one request state keeps it; a preempted request comes
    back as a new state (other blocks), and so does a new request that reuses the id."""
    buffers = _buffers()
    request = state("r", list(range(1, 9)), 7, [4, 5])
    assert buffers.prepare([(request, 1)], [0]).metadata.block_tables[0, 0, :2].tolist() == [4, 5]
    request.num_computed_tokens = 8
    request.all_token_ids.append(9)
    request.block_ids[0].append(6)
    assert buffers.prepare([(request, 1)], [0]).metadata.block_tables[0, 0, :3].tolist() == [4, 5, 6]
    writes = buffers.block_table_writes
    request.num_computed_tokens = 9
    request.all_token_ids.append(10)
    buffers.prepare([(request, 1)], [0])
    assert buffers.block_table_writes == writes  # nothing new: the row stands
    resumed = state("r", list(range(1, 10)), 0, [7, 8, 3])  # recomputed from scratch into other blocks
    meta = buffers.prepare([(resumed, 9)], [8]).metadata
    assert meta.block_tables[0, 0, :3].tolist() == [7, 8, 3]
    assert meta.slot_mapping[0].tolist()[-1] == 3 * BLOCK_SIZE
    reused_id = state("r", list(range(1, 9)), 0, [2, 1])
    assert buffers.prepare([(reused_id, 8)], [7]).metadata.block_tables[0, 0, :2].tolist() == [2, 1]


def test_each_kv_cache_group_gets_its_own_block_table_and_slots():
    """Gemma 2: a global group and a sliding one; the sliding group gave its first block back (the
    runner keeps the old id there: the kernels never read it)."""
    buffers = InputBuffers(max_num_tokens=64, max_num_seqs=8, max_model_len=32, block_size=BLOCK_SIZE,
                           device=torch.device("cpu"), num_kv_groups=2)
    request = CachedRequestState("r", list(range(1, 11)), [], SamplingParams(), 0, ([4, 5, 6], [7, 8, 9]), 9)
    meta = buffers.prepare([(request, 1)], [0]).metadata
    assert meta.block_tables[:, 0, :3].tolist() == [[4, 5, 6], [7, 8, 9]]
    assert meta.slot_mapping[:, 0].tolist() == [6 * 4 + 1, 9 * 4 + 1]
    request.num_computed_tokens = 12
    request.all_token_ids += [11, 12, 13]
    for blocks, new in zip(request.block_ids, (2, 3)):  # every group lists as many blocks
        blocks.append(new)
    writes = buffers.block_table_writes
    meta = buffers.prepare([(request, 1)], [0]).metadata
    assert buffers.block_table_writes == writes + 1
    assert meta.block_tables[:, 0, :4].tolist() == [[4, 5, 6, 2], [7, 8, 9, 3]]
    assert meta.slot_mapping[:, 0].tolist() == [2 * 4, 3 * 4]
