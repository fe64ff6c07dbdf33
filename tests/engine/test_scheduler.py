"""The token-budget scheduler, driven by a fake model that feeds sampled tokens back in.

`make_scheduler`, `make_request`, `fake_step` and `run_to_completion` come from conftest.py.
"""

import pytest

from engine.request import RequestStatus, child_request_id


def scheduled_tokens(output):
    return dict(output.num_scheduled_tokens)


def assert_all_blocks_free(scheduler):
    manager = scheduler.kv_cache_manager
    assert not manager.request_ids()
    assert manager.num_free_blocks == manager.block_pool.num_blocks - 1
    assert all(block.ref_cnt == 0 for block in manager.block_pool.blocks[1:])


def test_single_request_prefills_then_decodes_to_max_tokens(make_scheduler, make_request, fake_step):
    scheduler = make_scheduler()
    request = make_request("r", range(1, 11), max_tokens=3)
    scheduler.add_request(request)
    output, finished = fake_step(scheduler)
    assert scheduled_tokens(output) == {"r": 10} and output.sampling_req_ids == {"r"}
    assert request.num_computed_tokens == 10 and request.num_output_tokens == 1
    assert request.num_output_placeholders == 0
    [new] = output.new_requests
    assert new.req_id == "r" and new.num_computed_tokens == 0 and new.prompt_token_ids == list(range(1, 11))
    assert new.block_ids == scheduler.kv_cache_manager.get_block_ids("r")
    assert output.cached_requests == []
    output, _ = fake_step(scheduler)
    assert scheduled_tokens(output) == {"r": 1}
    assert output.new_requests == [] and [c.req_id for c in output.cached_requests] == ["r"]
    assert output.cached_requests[0].num_computed_tokens == 10
    _, finished = fake_step(scheduler)
    assert finished == [request]
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert request.num_output_tokens == 3
    assert not scheduler.has_unfinished_requests()
    assert_all_blocks_free(scheduler)


def test_token_budget_and_max_num_seqs_are_respected_every_step(make_scheduler, make_request, run_to_completion):
    scheduler = make_scheduler(num_blocks=256, max_num_batched_tokens=32, max_num_seqs=3,
                               long_prefill_token_threshold=8)
    requests = [make_request(f"r{i}", range(1, 5 + 9 * i), max_tokens=4 + i) for i in range(8)]
    for request in requests:
        scheduler.add_request(request)
    for output in run_to_completion(scheduler):
        assert 0 < output.total_num_scheduled_tokens <= 32
        assert len(output.num_scheduled_tokens) <= 3
    assert all(r.num_output_tokens == r.sampling_params.max_tokens for r in requests)
    assert_all_blocks_free(scheduler)


def test_long_prompt_is_prefilled_in_chunks(make_scheduler, make_request, fake_step):
    scheduler = make_scheduler(max_num_batched_tokens=16)
    request = make_request("long", range(1, 51), max_tokens=2)
    scheduler.add_request(request)
    chunks = []
    while request.num_output_tokens == 0:
        output, _ = fake_step(scheduler)
        chunks.append(scheduled_tokens(output)["long"])
        assert request.num_computed_tokens == sum(chunks)
    assert chunks == [16, 16, 16, 2]
    assert request.num_output_tokens == 1, "a token is sampled only after the last chunk"
    output, _ = fake_step(scheduler)
    assert scheduled_tokens(output) == {"long": 1}


def test_prefill_and_decode_mix_in_one_step(make_scheduler, make_request, fake_step):
    scheduler = make_scheduler(max_num_batched_tokens=64)
    decoder = make_request("decoder", range(1, 6), max_tokens=10)
    scheduler.add_request(decoder)
    fake_step(scheduler)
    newcomer = make_request("newcomer", range(100, 120), max_tokens=10)
    scheduler.add_request(newcomer)
    output, _ = fake_step(scheduler)
    assert scheduled_tokens(output) == {"decoder": 1, "newcomer": 20}
    assert decoder.num_output_tokens == 2 and newcomer.num_output_tokens == 1


def test_preemption_picks_the_worst_running_request_and_it_later_completes(
        make_scheduler, make_request, fake_step, run_to_completion):
    # 6 usable blocks of 4 tokens; three 7-token prompts take 2 blocks each and fill the pool.
    scheduler = make_scheduler(num_blocks=7, block_size=4, enable_caching=False)
    best = make_request("best", range(1, 8), priority=0, max_tokens=6)
    worst = make_request("worst", range(11, 18), priority=1, max_tokens=6)  # earliest, but low priority
    late = make_request("late", range(21, 28), priority=0, max_tokens=6)
    worst.arrival_time, best.arrival_time, late.arrival_time = 0.0, 1.0, 2.0
    for request in (worst, best, late):
        scheduler.add_request(request)
    fake_step(scheduler)
    assert {r.request_id for r in scheduler.running} == {"best", "worst", "late"}
    assert scheduler.kv_cache_manager.num_free_blocks == 0

    output, _ = fake_step(scheduler)  # token 8 (position 7) still fits in the second block
    assert not output.preempted_req_ids
    # Position 8 of each sequence needs a third block: someone has to go, and it is "worst".
    output, _ = fake_step(scheduler)
    assert output.preempted_req_ids[0] == "worst"
    assert "worst" not in scheduled_tokens(output)
    assert worst.status == RequestStatus.PREEMPTED
    assert worst.num_computed_tokens == 0 and worst in scheduler.waiting
    assert not scheduler.kv_cache_manager.holds("worst")
    assert scheduler.num_preemptions >= 1
    outputs_before = list(worst.output_token_ids)

    run_to_completion(scheduler)
    for request in (best, worst, late):
        assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
        assert request.num_output_tokens == 6
    assert worst.output_token_ids[:len(outputs_before)] == outputs_before
    assert worst.num_preemptions >= 1
    assert_all_blocks_free(scheduler)


def test_preemption_among_equal_priorities_takes_the_latest_arrival(make_scheduler, make_request, fake_step):
    scheduler = make_scheduler(num_blocks=7, block_size=4, enable_caching=False)
    requests = [make_request(f"r{i}", range(10 * i + 1, 10 * i + 8), max_tokens=6) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    fake_step(scheduler)
    fake_step(scheduler)
    output, _ = fake_step(scheduler)
    assert output.preempted_req_ids and output.preempted_req_ids[0] == "r2"
    assert "r2" not in scheduled_tokens(output)


def test_recompute_after_preemption_covers_prompt_and_generated_tokens(make_scheduler, make_request, fake_step):
    scheduler = make_scheduler(num_blocks=7, block_size=4, enable_caching=False)
    requests = [make_request(f"r{i}", range(10 * i + 1, 10 * i + 8), max_tokens=8) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    by_id = {r.request_id: r for r in requests}
    victim = None
    for _ in range(20):
        output, _ = fake_step(scheduler)
        if output.preempted_req_ids:
            victim = by_id[output.preempted_req_ids[0]]
            num_tokens_when_preempted = victim.num_tokens
            break
    assert victim is not None
    for _ in range(50):
        output = scheduler.schedule()
        if victim.request_id in scheduled_tokens(output):
            break
        scheduler.update(output, {request_id: 10 for request_id in output.sampling_req_ids})
    # Readmitted: all its tokens (prompt and output so far) are computed again before it samples.
    assert scheduled_tokens(output)[victim.request_id] == num_tokens_when_preempted
    assert victim.request_id in output.sampling_req_ids
    # The runner forgot it when it was preempted: it comes back as a new request, with its outputs.
    [new] = [data for data in output.new_requests if data.req_id == victim.request_id]
    assert new.num_computed_tokens == 0 and victim.num_tokens == num_tokens_when_preempted
    assert new.prompt_token_ids + new.output_token_ids == victim.all_token_ids
    scheduler.update(output, {request_id: 10 for request_id in output.sampling_req_ids})
    assert victim.num_tokens == num_tokens_when_preempted + 1


def test_lower_priority_value_is_admitted_first(make_scheduler, make_request, run_to_completion):
    scheduler = make_scheduler(max_num_seqs=1)
    specs = [("batch", 5), ("interactive", 0), ("standard", 2), ("interactive-2", 0)]
    for name, priority in specs:
        scheduler.add_request(make_request(name, range(1, 9), priority=priority, max_tokens=2))
    order = []
    for output in run_to_completion(scheduler):
        for request_id in output.num_scheduled_tokens:
            if request_id not in order:
                order.append(request_id)
    assert order == ["interactive", "interactive-2", "standard", "batch"]


def test_equal_priorities_are_first_come_first_served(make_scheduler, make_request, run_to_completion):
    scheduler = make_scheduler(max_num_seqs=1)
    for name in ("a", "b", "c"):
        scheduler.add_request(make_request(name, range(1, 5), max_tokens=2))
    order = []
    for output in run_to_completion(scheduler):
        order.extend(request_id for request_id in output.num_scheduled_tokens if request_id not in order)
    assert order == ["a", "b", "c"]


def test_abort_a_waiting_request(make_scheduler, make_request, fake_step):
    scheduler = make_scheduler(max_num_seqs=1)
    running = make_request("running", range(1, 9))
    waiting = make_request("waiting", range(11, 19))
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    fake_step(scheduler)
    assert waiting in scheduler.waiting
    assert scheduler.finish_requests("waiting", RequestStatus.FINISHED_ABORTED) == [waiting]
    assert waiting.status == RequestStatus.FINISHED_ABORTED
    assert waiting not in scheduler.waiting
    assert scheduler.finish_requests("waiting", RequestStatus.FINISHED_ABORTED) == [], "aborting twice is a no-op"
    assert scheduler.finish_requests("no-such-request", RequestStatus.FINISHED_ABORTED) == []


def test_abort_a_running_request_frees_its_blocks(make_scheduler, make_request, fake_step):
    scheduler = make_scheduler()
    request = make_request("r", range(1, 20), max_tokens=50)
    other = make_request("other", range(31, 40), max_tokens=3)
    scheduler.add_request(request)
    scheduler.add_request(other)
    fake_step(scheduler)
    fake_step(scheduler)
    assert scheduler.kv_cache_manager.get_block_ids("r")
    scheduler.finish_requests(["r"], RequestStatus.FINISHED_ABORTED)
    assert request.status == RequestStatus.FINISHED_ABORTED
    assert request not in scheduler.running
    assert not scheduler.kv_cache_manager.holds("r")
    while scheduler.has_unfinished_requests():
        output, _ = fake_step(scheduler)
        assert "r" not in scheduled_tokens(output)
    assert_all_blocks_free(scheduler)


def test_abort_while_the_step_runs_is_ignored_by_update(make_scheduler, make_request):
    scheduler = make_scheduler()
    request = make_request("r", range(1, 9))
    scheduler.add_request(request)
    output = scheduler.schedule()
    scheduler.finish_requests("r", RequestStatus.FINISHED_ABORTED)  # e.g. the client went away
    assert scheduler.update(output, {"r": 42}) == []
    assert request.output_token_ids == []
    assert not scheduler.has_unfinished_requests()
    assert_all_blocks_free(scheduler)


def test_abort_a_chunked_prefill_midway(make_scheduler, make_request, fake_step):
    scheduler = make_scheduler(max_num_batched_tokens=8)
    request = make_request("r", range(1, 40))
    scheduler.add_request(request)
    fake_step(scheduler)
    fake_step(scheduler)
    assert 0 < request.num_computed_tokens < request.num_prompt_tokens
    scheduler.finish_requests("r", RequestStatus.FINISHED_ABORTED)
    assert_all_blocks_free(scheduler)
    assert scheduler.schedule().is_empty()


def test_short_request_is_not_starved_by_a_long_prefill(make_scheduler, make_request, fake_step):
    scheduler = make_scheduler(num_blocks=256, max_num_batched_tokens=64, long_prefill_token_threshold=16)
    long = make_request("long", range(1, 801), max_tokens=4)
    scheduler.add_request(long)
    fake_step(scheduler)  # alone: the long prefill takes the whole budget
    assert long.num_computed_tokens == 64
    short = make_request("short", range(1000, 1008), max_tokens=4)
    scheduler.add_request(short)
    for step in range(2):
        output, _ = fake_step(scheduler)
        if "short" in scheduled_tokens(output):
            break
    assert "short" in scheduled_tokens(output), "the short request waited behind the long prefill"
    assert scheduled_tokens(output)["long"] <= 16
    assert short.num_output_tokens == 1


def test_running_decode_is_not_starved_by_a_long_prefill(make_scheduler, make_request, fake_step):
    """Once admitted, a short request decodes every step while an earlier long prompt keeps
    prefilling: the long prefill's chunks must leave room in the token budget for it."""
    scheduler = make_scheduler(num_blocks=256, max_num_batched_tokens=64, long_prefill_token_threshold=16)
    long = make_request("long", range(1, 801), max_tokens=4)
    scheduler.add_request(long)
    fake_step(scheduler)
    short = make_request("short", range(1000, 1008), max_tokens=4)
    scheduler.add_request(short)
    fake_step(scheduler)
    assert short.status == RequestStatus.RUNNING and short.num_output_tokens == 1
    for _ in range(3):
        output, _ = fake_step(scheduler)
        assert "short" in scheduled_tokens(output), (
            f"the running short request got no tokens; the long prefill took {scheduled_tokens(output)}")
    assert short.status == RequestStatus.FINISHED_LENGTH_CAPPED and short.num_output_tokens == 4
    assert long.num_output_tokens == 0 and long.num_computed_tokens > 64


def test_max_model_len_caps_generation(make_scheduler, make_request, run_to_completion):
    scheduler = make_scheduler(max_model_len=12)
    request = make_request("r", range(1, 9), max_tokens=100)
    scheduler.add_request(request)
    run_to_completion(scheduler)
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert request.num_tokens == 12 and request.num_output_tokens == 4


def test_stop_token_ids_and_min_tokens(make_scheduler, make_request, run_to_completion):
    scheduler = make_scheduler()
    stops = make_request("stops", range(1, 5), stop_token_ids=[7], max_tokens=20)
    waits = make_request("waits", range(1, 5), stop_token_ids=[7], min_tokens=3, max_tokens=20)
    scheduler.add_request(stops)
    scheduler.add_request(waits)
    run_to_completion(scheduler, next_token=lambda request: 7)
    assert stops.status == RequestStatus.FINISHED_STOPPED and stops.output_token_ids == [7]
    assert stops.stop_reason == 7
    assert waits.status == RequestStatus.FINISHED_STOPPED and waits.output_token_ids == [7, 7, 7]


def test_eos_stops_unless_ignored(make_scheduler, make_request, run_to_completion):
    scheduler = make_scheduler()
    stops = make_request("stops", range(1, 5), max_tokens=5)
    ignores = make_request("ignores", range(1, 5), max_tokens=5, ignore_eos=True)
    for request in (stops, ignores):
        request.sampling_params.all_stop_token_ids = {2}  # what the engine fills in from the tokenizer
        scheduler.add_request(request)
    run_to_completion(scheduler, next_token=lambda request: 2)
    assert stops.status == RequestStatus.FINISHED_STOPPED and stops.output_token_ids == [2]
    assert stops.stop_reason is None
    assert ignores.status == RequestStatus.FINISHED_LENGTH_CAPPED and ignores.num_output_tokens == 5


# -- n > 1: children share the prompt's blocks ---------------------------------------------------


@pytest.mark.parametrize("enable_caching", [True, False])
def test_children_share_the_prompt_blocks_of_the_first_child(make_scheduler, make_request, fake_step,
                                                             run_to_completion, enable_caching):
    block = 4
    scheduler = make_scheduler(block_size=block, max_num_batched_tokens=8, enable_caching=enable_caching)
    prompt = list(range(1, 19))  # 18 tokens: 4 full blocks and a partial one
    children = [make_request(child_request_id("p", k), prompt, parent_id="p", index=k, max_tokens=3)
                for k in range(3)]
    for child in children:
        scheduler.add_request(child)

    # Child 0 prefills in chunks; the others wait until the whole prompt is computed.
    while children[0].num_computed_tokens < len(prompt):
        output, _ = fake_step(scheduler)
        assert set(scheduled_tokens(output)) == {children[0].request_id}

    output, _ = fake_step(scheduler)
    tokens = scheduled_tokens(output)
    assert tokens[children[1].request_id] == len(prompt) - 16  # only the tail past 4 shared blocks
    manager = scheduler.kv_cache_manager
    first_blocks = manager.groups[0].req_to_blocks[children[0].request_id]
    second_blocks = manager.groups[0].req_to_blocks[children[1].request_id]
    assert second_blocks[:4] == first_blocks[:4]
    assert second_blocks[4] is not first_blocks[4], "the partly filled block is never shared"
    expected_refs = 3 if children[2].request_id in tokens else 2
    assert all(b.ref_cnt == expected_refs for b in first_blocks[:4])
    assert first_blocks[4].ref_cnt == 1

    run_to_completion(scheduler)
    assert all(c.status == RequestStatus.FINISHED_LENGTH_CAPPED and c.num_output_tokens == 3 for c in children)
    assert all(c.num_cached_tokens == 16 for c in children[1:])
    assert_all_blocks_free(scheduler)


def test_children_with_prefix_caching_off_hold_their_shared_blocks_to_two_refs(
        make_scheduler, make_request, fake_step):
    scheduler = make_scheduler(block_size=4, enable_caching=False)
    prompt = list(range(1, 11))  # 2 full blocks + 2 tokens
    first = make_request(child_request_id("p", 0), prompt, parent_id="p", index=0, max_tokens=5)
    second = make_request(child_request_id("p", 1), prompt, parent_id="p", index=1, max_tokens=5)
    scheduler.add_request(first)
    scheduler.add_request(second)
    output, _ = fake_step(scheduler)
    assert set(scheduled_tokens(output)) == {first.request_id}
    output, _ = fake_step(scheduler)
    assert scheduled_tokens(output) == {first.request_id: 1, second.request_id: 2}
    manager = scheduler.kv_cache_manager
    shared = manager.groups[0].req_to_blocks[first.request_id][:2]
    assert manager.groups[0].req_to_blocks[second.request_id][:2] == shared
    assert [b.ref_cnt for b in shared] == [2, 2]
    assert manager.block_pool.cached_block_hash_to_block == {}
    # When one child finishes, the other still holds the shared blocks.
    scheduler.finish_requests(first.request_id, RequestStatus.FINISHED_ABORTED)
    assert [b.ref_cnt for b in shared] == [1, 1]
    assert manager.groups[0].req_to_blocks[second.request_id][:2] == shared


# -- the engine refuses work it can never schedule ------------------------------------------------


def test_engine_rejects_a_request_that_can_never_fit_in_the_kv_cache(tiny_hf_checkpoint):
    """3 usable blocks of 4 tokens hold 12 tokens; a 20-token prompt can never be scheduled.
    The engine must say so (ValueError, at start-up or when the request is added) instead of
    leaving the request waiting forever (LLM.generate would spin without end)."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    folder, _ = tiny_hf_checkpoint("llama")
    try:
        engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", block_size=4, num_gpu_blocks_override=4))
    except ValueError:
        return  # refused at start-up: max_model_len exceeds what the KV cache can hold
    try:
        engine.add_request("too-long", list(range(3, 23)), SamplingParams(max_tokens=2))
    except ValueError:
        return
    for _ in range(20):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    assert not engine.has_unfinished_requests(), "a request that can never fit the KV cache is stuck forever"
