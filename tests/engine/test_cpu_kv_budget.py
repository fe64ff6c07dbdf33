"""The CPU KV cache's default size: what max_num_seqs full sequences need, within a share of free memory."""

import logging

import pytest

from engine import LLM
from engine.worker.cpu_kv_budget import (
    DEFAULT_MEMORY_FRACTION,
    available_memory_bytes,
    cpu_kv_cache_bytes,
    kv_bytes_per_token,
)

GiB = 2**30
SMOLLM2_FP32 = kv_bytes_per_token(num_layers=30, num_kv_heads=3, head_dim=64, dtype_size=4)


def test_bytes_per_token_counts_keys_and_values_of_every_layer():
    assert SMOLLM2_FP32 == 2 * 30 * 3 * 64 * 4 == 46080


def test_a_small_workload_gets_what_it_needs_not_a_fixed_4_gib():
    budget = cpu_kv_cache_bytes(SMOLLM2_FP32, block_size=16, max_num_seqs=4, max_model_len=1000,
                                available_bytes=64 * GiB)
    blocks = 4 * 63 + 1  # ceil(1000 / 16) blocks a sequence, plus the null block
    assert budget == blocks * 16 * SMOLLM2_FP32
    assert budget < GiB / 4


def test_a_large_workload_is_capped_by_the_share_of_available_memory():
    available = 8 * GiB
    budget = cpu_kv_cache_bytes(SMOLLM2_FP32, block_size=16, max_num_seqs=256, max_model_len=8192,
                                available_bytes=available)
    assert budget <= available * DEFAULT_MEMORY_FRACTION
    assert budget > available * DEFAULT_MEMORY_FRACTION - 16 * SMOLLM2_FP32  # whole blocks, as many as fit
    assert budget % (16 * SMOLLM2_FP32) == 0
    half = cpu_kv_cache_bytes(SMOLLM2_FP32, 16, 256, 8192, available, fraction=0.5)
    assert half > budget


def test_too_little_memory_for_one_full_sequence_is_a_clear_error():
    one_sequence = (8192 // 16 + 1) * 16 * SMOLLM2_FP32
    just_enough = cpu_kv_cache_bytes(SMOLLM2_FP32, 16, 256, 8192, available_bytes=4 * one_sequence, fraction=0.25)
    assert just_enough == one_sequence
    with pytest.raises(ValueError, match="max_model_len=8192.*kv_cache_memory_bytes"):
        cpu_kv_cache_bytes(SMOLLM2_FP32, 16, 256, 8192, available_bytes=4 * one_sequence - 1, fraction=0.25)


def test_available_memory_is_read_from_the_machine():
    assert 0 < available_memory_bytes() < 2**50


def test_the_engine_sizes_its_cache_from_the_model_and_the_flag_still_overrides(caplog):
    with caplog.at_level(logging.INFO, logger="engine.worker.model_runner"):
        llm = LLM("dummy:smollm2-135m", max_num_seqs=2, max_model_len=256)
    assert llm.llm_engine.runner.num_blocks == 2 * 256 // 16 + 1
    assert "CPU KV cache" in caplog.text and "max_num_seqs=2 x max_model_len=256" in caplog.text
    explicit = LLM("dummy:smollm2-135m", max_num_seqs=2, max_model_len=256,
                   kv_cache_memory_bytes=100 * 16 * SMOLLM2_FP32)
    assert explicit.llm_engine.runner.num_blocks == 100
