"""The row argmax against torch.argmax: ties (the first index wins, also across chunks), NaN (the
first NaN wins), rows of -inf, a row stride wider than the vocabulary with NaN in the gap (never to
be read), and batch sizes that take one chunk per row or several."""

import pytest
import torch

from kernels.argmax import BLOCK, argmax, num_chunks_for
from tests.kernels.kernel_testing import DEVICE, DTYPES, gpu_only, randn


def strided_logits(rows: int, vocab: int, dtype, seed: int = 0) -> torch.Tensor:
    """`[rows, vocab]` whose row stride is vocab + 5, the 5 columns after each row NaN."""
    wide = randn(rows, vocab + 5, dtype=dtype, seed=seed)
    wide[:, vocab:] = float("nan")
    return wide[:, :vocab]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, vocab", [(1, 3 * BLOCK + 17), (3, 100), (700, 2 * BLOCK + 1)])
def test_matches_torch_argmax(dtype, rows, vocab):
    logits = strided_logits(rows, vocab, dtype)
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))


def test_a_strided_column_is_read_right():
    logits = randn(5, 2 * 300, dtype=torch.float32, seed=3)[:, ::2]
    assert torch.equal(argmax(logits), logits.argmax(dim=-1))


def test_one_row_is_cut_into_chunks_and_many_rows_are_not():
    assert num_chunks_for(1, 128256) > 1
    assert num_chunks_for(1024, 128256) == 1
    assert num_chunks_for(1, 100) == 1


@pytest.mark.parametrize("rows", [1, 600])  # several chunks per row, and one
def test_ties_nan_and_minus_infinity_follow_torch(rows):
    vocab = 3 * BLOCK + 5
    logits = strided_logits(rows, vocab, torch.float32, seed=1)
    row_max = logits.abs().max() + 1
    logits[0, [BLOCK + 3, 2 * BLOCK + 9, 7]] = row_max  # tie across chunks: index 7 is first
    if rows > 1:
        logits[1, [2 * BLOCK + 1, BLOCK + 4]] = float("nan")  # first NaN wins over any number
        logits[1, 0] = float("inf")
        logits[2] = float("-inf")  # all equal: index 0
        logits[3, -1] = row_max  # the last column
    expected = logits.argmax(dim=-1)
    assert torch.equal(argmax(logits), expected)
    assert expected[0] == 7


@gpu_only
def test_llama_vocabulary_in_bfloat16_on_gpu():
    for rows in (1, 8, 256):
        logits = randn(rows, 128256, dtype=torch.bfloat16, seed=rows)
        assert torch.equal(argmax(logits), logits.argmax(dim=-1))
