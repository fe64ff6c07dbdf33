"""The scheduler's LoRA rule, on the real Scheduler with the test playing the model: at most
max_loras distinct adapters among the running requests, base requests never held back, and an
adapter kept out by a steady stream of others' requests gets its slot after STARVATION_STEPS."""

from __future__ import annotations

from engine.config import SchedulerConfig
from engine.core.block_pool import hash_block_tokens
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.lora_admission import STARVATION_STEPS
from engine.core.scheduler import Scheduler
from engine.lora.request import LoRARequest

ADAPTERS = {i: LoRARequest(f"adapter-{i}", i, f"/adapters/{i}") for i in range(1, 5)}


def make_scheduler(max_loras: int) -> Scheduler:
    config = SchedulerConfig(max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=256,
                             long_prefill_token_threshold=256)
    return Scheduler(config, KVCacheManager(512, 4), max_loras=max_loras)


def add(scheduler, make_request, request_id, lora_id, max_tokens=4):
    request = make_request(request_id, [5, 6, 7, 8, 9], max_tokens=max_tokens)
    request.lora_request = ADAPTERS.get(lora_id)
    scheduler.add_request(request)
    return request


def running_adapters(scheduler) -> set[int]:
    return {r.lora_int_id for r in scheduler.running if r.lora_int_id}


def test_at_most_max_loras_adapters_run_and_the_rest_wait(make_request, fake_step):
    scheduler = make_scheduler(max_loras=2)
    for i, lora_id in enumerate([1, 2, 3, 1, 0, 3, 4, 0]):
        add(scheduler, make_request, f"r{i}", lora_id)
    output, _ = fake_step(scheduler)
    assert running_adapters(scheduler) == {1, 2}
    assert {data.req_id for data in output.new_requests} == {"r0", "r1", "r3", "r4", "r7"}  # base ones too
    assert {d.lora_request.lora_int_id for d in output.new_requests if d.lora_request} == {1, 2}
    seen = set()
    while scheduler.has_unfinished_requests():
        fake_step(scheduler)
        assert len(running_adapters(scheduler)) <= 2
        seen |= running_adapters(scheduler)
    assert seen >= {3, 4}


def test_an_adapter_kept_out_by_a_stream_of_others_gets_its_slot(make_request, fake_step):
    scheduler = make_scheduler(max_loras=1)
    add(scheduler, make_request, "first", 1, max_tokens=2)
    fake_step(scheduler)
    starving = add(scheduler, make_request, "starving", 2)
    for step in range(3 * STARVATION_STEPS):
        add(scheduler, make_request, f"more-{step}", 1, max_tokens=2)  # adapter 1 never runs dry by itself
        fake_step(scheduler)
        if starving.lora_int_id in running_adapters(scheduler) or starving.is_finished():
            break
    assert STARVATION_STEPS <= step < 2 * STARVATION_STEPS
    base = add(scheduler, make_request, "base", 0)
    fake_step(scheduler)
    assert base in scheduler.running or base.is_finished()


def test_the_adapter_is_part_of_the_block_hash():
    tokens = [1, 2, 3, 4]
    assert hash_block_tokens(None, tokens, None) == hash_block_tokens(None, tokens, None, 0)
    assert len({hash_block_tokens(None, tokens, None, lora_id) for lora_id in (0, 1, 2)}) == 3
    assert hash_block_tokens(None, tokens, "tenant", 1) != hash_block_tokens(None, tokens, "tenant", 2)
