"""InputBuffers: the flat inputs of a mixed step, and the padding a CUDA graph's batch gets."""

import torch

from engine.worker.input_buffers import NULL_SLOT, InputBuffers

BLOCK_SIZE = 4


def _buffers() -> InputBuffers:
    return InputBuffers(max_num_tokens=64, max_num_seqs=8, max_model_len=32, block_size=BLOCK_SIZE,
                        device=torch.device("cpu"))


def test_mixed_step_is_flattened_decodes_first(make_request):
    decode = make_request("d", [11, 12, 13, 14, 15])
    decode.num_computed_tokens = 4  # token 15 at position 4: the second block's first slot
    prefill = make_request("p", [21, 22, 23, 24, 25, 26])
    prefill.num_computed_tokens = 1  # a chunk of tokens 1..5
    block_ids = {"d": [7, 3], "p": [5, 9]}
    inputs = _buffers().prepare([(decode, 1), (prefill, 5)], block_ids, sample_rows=[0, 5])
    meta = inputs.metadata
    assert inputs.input_ids.tolist() == [15, 22, 23, 24, 25, 26]
    assert inputs.positions.tolist() == [4, 1, 2, 3, 4, 5]
    assert meta.slot_mapping.tolist() == [3 * 4, 5 * 4 + 1, 5 * 4 + 2, 5 * 4 + 3, 9 * 4, 9 * 4 + 1]
    assert meta.seq_lens.tolist() == meta.seq_lens_cpu == [5, 6]
    assert meta.query_start_loc_cpu == [0, 1, 6]
    assert meta.block_tables[:, :2].tolist() == [[7, 3], [5, 9]]
    assert (meta.num_decodes, meta.decode_max_seq_len, meta.decode_max_blocks) == (1, 5, 2)
    assert inputs.sample_rows.tolist() == [0, 5]


def test_decode_batch_is_padded_to_the_graph_size_over_the_null_block(make_request):
    buffers = _buffers()
    requests = [make_request(str(i), list(range(1, 4 + i))) for i in range(3)]
    for request in requests:
        request.num_computed_tokens = request.num_tokens - 1
    buffers.block_tables.np[:] = 6  # stale rows of earlier steps
    inputs = buffers.prepare([(r, 1) for r in requests], {str(i): [i + 1, 7] for i in range(3)}, [0, 1, 2],
                             padded_seqs=8)
    meta = inputs.metadata
    assert inputs.input_ids.tolist() == [3, 4, 5] + [0] * 5
    assert inputs.positions.tolist() == [2, 3, 4] + [0] * 5
    assert meta.slot_mapping.tolist() == [1 * 4 + 2, 2 * 4 + 3, 7 * 4 + 0] + [NULL_SLOT] * 5
    assert meta.seq_lens.tolist() == meta.seq_lens_cpu == [3, 4, 5] + [1] * 5
    assert meta.query_start_loc_cpu == list(range(9))
    assert meta.block_tables[3:, 0].tolist() == [0] * 5
    # A graph's launch fits any step: sized for max_model_len, not this step's lengths.
    assert (meta.num_decodes, meta.decode_max_seq_len, meta.decode_max_blocks) == (8, 32, 8)


def test_block_table_rows_follow_new_blocks_preemption_and_new_requests(make_request):
    """A row is rewritten only in part while one request keeps it: never past a preemption (new
    blocks) or a new request that reuses the id."""
    buffers = _buffers()
    request = make_request("r", list(range(1, 9)))
    request.num_computed_tokens = 7
    assert buffers.prepare([(request, 1)], {"r": [4, 5]}, [0]).metadata.block_tables[0, :2].tolist() == [4, 5]
    request.num_computed_tokens = 8
    request.all_token_ids.append(9)
    assert buffers.prepare([(request, 1)], {"r": [4, 5, 6]}, [0]).metadata.block_tables[0, :3].tolist() == [4, 5, 6]
    request.num_preemptions += 1  # recomputed from scratch into other blocks
    request.num_computed_tokens = 0
    meta = buffers.prepare([(request, 9)], {"r": [7, 8, 3]}, [8]).metadata
    assert meta.block_tables[0, :3].tolist() == [7, 8, 3]
    assert meta.slot_mapping.tolist()[-1] == 3 * BLOCK_SIZE
    reused_id = make_request("r", list(range(1, 9)))
    assert buffers.prepare([(reused_id, 8)], {"r": [2, 1]}, [7]).metadata.block_tables[0, :2].tolist() == [2, 1]
