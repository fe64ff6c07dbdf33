"""The Triton token-bitmask kernel against the torch reference, and the reference against a plain
per-token reading of the bits."""

import pytest
import torch

from engine.structured_outputs.bitmask import apply_token_bitmask_reference as reference
from kernels.apply_token_bitmask import apply_token_bitmask
from tests.kernels.kernel_testing import DEVICE, DTYPES, gpu_only, randn


def random_bitmask(num_rows: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31, (num_rows, -(-vocab // 32)), generator=generator, dtype=torch.int64)
    words[0] = 0  # a row with nothing allowed but what the last word allows
    words[0, -1] = 1
    return words.to(torch.int32).to(DEVICE)


def check(batch: int, rows: list[int], vocab: int, dtype, *, stride_pad: int = 0, seed: int = 0):
    logits = randn(batch, vocab + stride_pad, dtype=dtype, seed=seed)[:, :vocab]
    bitmask = random_bitmask(len(rows), vocab, seed)
    row_ids = torch.tensor(rows, dtype=torch.long, device=DEVICE)
    expected = logits.clone()
    reference(expected, bitmask, row_ids)
    actual = logits.clone()
    apply_token_bitmask(actual, bitmask, row_ids)
    assert torch.equal(actual, expected)
    return logits, bitmask, expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, rows, vocab", [
    (1, [0], 1),
    (3, [2, 0], 100),          # rows out of order, one row untouched, a partial last word
    (4, [1, 3], 4096 + 33),    # more than one program per row
])
def test_matches_reference(dtype, batch, rows, vocab):
    check(batch, rows, vocab, dtype)


def test_strided_logits_and_no_rows():
    check(2, [1], 70, torch.float32, stride_pad=6)
    logits = randn(2, 64, dtype=torch.float32)
    before = logits.clone()
    apply_token_bitmask(logits, torch.zeros(0, 2, dtype=torch.int32, device=DEVICE),
                        torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert torch.equal(logits, before)


def test_reference_reads_bit_t_of_word_t_over_32():
    logits, bitmask, masked = check(3, [2, 0], 77, torch.float32, seed=5)
    for k, row in enumerate([2, 0]):
        for token in range(77):
            allowed = (int(bitmask[k, token // 32]) >> (token % 32)) & 1
            assert masked[row, token] == (logits[row, token] if allowed else float("-inf"))
    assert torch.equal(masked[1], logits[1])


@gpu_only
def test_bfloat16_llama3_vocabulary_on_gpu():
    check(512, list(range(0, 512, 2)), 128256, torch.bfloat16)
