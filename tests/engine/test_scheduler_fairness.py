"""Fair scheduling between tenants (issue 15, finding 5): strict priorities, turns between tenants.

Scheduler-level tests drive the real Scheduler with the fake model of conftest.py; the last test
runs the real engine on a tiny checkpoint.
"""

import random

import pytest

from engine.core.waiting_queue import WaitingQueue
from engine.request import RequestStatus, child_request_id


def step_admitting(scheduler, fake_step):
    """One step; the requests it admitted (were waiting before it), in admission order."""
    waiting = {request.request_id: request for request in scheduler.waiting}
    output, _ = fake_step(scheduler)
    return output, [waiting[request_id] for request_id in output.num_scheduled_tokens if request_id in waiting]


@pytest.mark.parametrize("num_flood_tenants", [1, 3])
def test_a_small_tenant_behind_a_flood_is_admitted_within_one_admission_per_other_tenant(
        make_scheduler, make_request, fake_step, num_flood_tenants):
    """Bound: a tenant that starts waiting is admitted after at most one admission per other
    tenant waiting at its priority; under FIFO it would wait for all 3,000 flood sequences."""
    scheduler = make_scheduler(num_blocks=512, max_num_seqs=8)
    for i in range(3000):
        tenant = f"flood-{i % num_flood_tenants}"
        scheduler.add_request(make_request(f"{tenant}/{i}", range(1, 5), tenant=tenant, max_tokens=4))
    for _ in range(20):
        fake_step(scheduler)
    assert len(scheduler.waiting) > 2800
    small = make_request("small", range(100, 104), tenant="small", max_tokens=4)
    scheduler.add_request(small)

    admitted = []
    while not admitted:
        _, admitted = step_admitting(scheduler, fake_step)
    assert small in admitted[:num_flood_tenants], [r.request_id for r in admitted]
    for _ in range(3):
        fake_step(scheduler)
    assert small.status == RequestStatus.FINISHED_LENGTH_CAPPED and small.num_output_tokens == 4
    assert len(scheduler.waiting) > 2700, "the small call finished while the flood still waits"


def test_two_tenants_take_turns_even_when_one_arrives_later(make_scheduler, make_request, fake_step):
    """Equal shares, and no credit for having been idle: tenant b, arriving after a has had 40
    admissions, gets every other admission from then on, not the next 40 in a row."""
    scheduler = make_scheduler(num_blocks=512, max_num_seqs=4)
    for i in range(300):
        scheduler.add_request(make_request(f"a{i}", range(1, 5), tenant="a", max_tokens=2))
    admissions = []
    while len(admissions) < 40:
        admissions += step_admitting(scheduler, fake_step)[1]
    assert {r.tenant for r in admissions} == {"a"}
    for i in range(300):
        scheduler.add_request(make_request(f"b{i}", range(1, 5), tenant="b", max_tokens=2))
    admissions = []
    while len(admissions) < 200:
        admissions += step_admitting(scheduler, fake_step)[1]
    for end in range(1, 201):
        tenants = [r.tenant for r in admissions[:end]]
        assert abs(tenants.count("a") - tenants.count("b")) <= 1, tenants
    within_a = [int(r.request_id[1:]) for r in admissions if r.tenant == "a"]
    assert within_a == sorted(within_a), "a tenant's own requests are admitted in arrival order"


def test_priorities_stay_strict_and_tenants_take_turns_within_one(make_scheduler, make_request, fake_step):
    scheduler = make_scheduler(num_blocks=512, max_num_seqs=4)
    for tenant in ("x", "y"):  # the low priority tenants arrive first, all of x before y
        for i in range(30):
            scheduler.add_request(make_request(f"low-{tenant}{i}", range(1, 5), tenant=tenant, priority=5,
                                               max_tokens=2))
    for i in range(40):
        scheduler.add_request(make_request(f"high{i}", range(1, 5), tenant="z", priority=0, max_tokens=2))
    admissions = []
    while scheduler.has_unfinished_requests():
        admissions += step_admitting(scheduler, fake_step)[1]
    assert [r.priority for r in admissions] == [0] * 40 + [5] * 60
    low = [r.tenant for r in admissions[40:]]
    assert low == ["x", "y"] * 30


def test_preemption_takes_the_latest_sequence_of_the_tenant_with_the_most_running(
        make_scheduler, make_request, fake_step, run_to_completion):
    # 8 usable blocks of 4 tokens; four 7-token prompts take 2 blocks each and fill the pool.
    scheduler = make_scheduler(num_blocks=9, block_size=4, enable_caching=False)
    big = [make_request(f"big{i}", range(10 * i + 1, 10 * i + 8), tenant="big", max_tokens=6) for i in range(3)]
    small = make_request("small", range(91, 98), tenant="small", max_tokens=6)  # the latest arrival
    for request in (*big, small):
        scheduler.add_request(request)
    fake_step(scheduler)
    assert scheduler.kv_cache_manager.num_free_blocks == 0
    fake_step(scheduler)
    output, _ = fake_step(scheduler)  # position 8 needs a third block for everyone
    assert output.preempted_req_ids and output.preempted_req_ids[0] == big[2].request_id, output.preempted_req_ids
    assert big[2].status == RequestStatus.PREEMPTED
    preempted = {r for out in run_to_completion(scheduler) for r in out.preempted_req_ids} | set(
        output.preempted_req_ids)
    assert "small" not in preempted and small.num_preemptions == 0
    for request in (*big, small):
        assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED and request.num_output_tokens == 6
    manager = scheduler.kv_cache_manager
    assert not manager.request_ids() and manager.num_free_blocks == manager.block_pool.num_blocks - 1


def test_preemption_still_takes_the_worst_priority_first(make_scheduler, make_request, fake_step):
    scheduler = make_scheduler(num_blocks=9, block_size=4, enable_caching=False)
    batch = make_request("batch", range(91, 98), tenant="small", priority=3, max_tokens=6, arrival_time=-1.0)
    big = [make_request(f"big{i}", range(10 * i + 1, 10 * i + 8), tenant="big", max_tokens=6) for i in range(3)]
    for request in (batch, *big):
        scheduler.add_request(request)
    fake_step(scheduler)
    fake_step(scheduler)
    output, _ = fake_step(scheduler)
    assert output.preempted_req_ids and output.preempted_req_ids[0] == batch.request_id
    assert batch.status == RequestStatus.PREEMPTED


def test_siblings_and_prefix_sharing_work_while_another_tenant_is_admitted(
        make_scheduler, make_request, fake_step, run_to_completion):
    """Children k > 0 of an n > 1 request wait for child 0's prompt; meanwhile another tenant's
    requests are admitted, and afterwards the children still share child 0's prompt blocks."""
    scheduler = make_scheduler(block_size=4, num_blocks=128, max_num_batched_tokens=16, long_prefill_token_threshold=4)
    prompt = list(range(1, 19))  # 18 tokens: 4 full blocks and a partial one
    children = [make_request(child_request_id("p", k), prompt, parent_id="p", index=k, tenant="wide", max_tokens=3)
                for k in range(6)]
    others = [make_request(f"other{i}", range(50 + 4 * i, 54 + 4 * i), tenant="other", max_tokens=3)
              for i in range(3)]
    for request in (*children, *others):
        scheduler.add_request(request)
    admitted = []
    while children[0].num_computed_tokens < len(prompt):
        admitted += step_admitting(scheduler, fake_step)[1]
    assert set(admitted) == {children[0], *others}, "the other tenant waited behind the siblings"
    run_to_completion(scheduler)
    assert all(c.status == RequestStatus.FINISHED_LENGTH_CAPPED and c.num_output_tokens == 3 for c in children)
    assert all(c.num_cached_tokens == 16 for c in children[1:])
    assert all(r.num_output_tokens == 3 for r in others)


def test_waiting_queue_aborts_and_passed_over_requests_keep_it_consistent(make_request):
    queue = WaitingQueue()
    a = [make_request(f"a{i}", [1], tenant="a") for i in range(3)]
    b = [make_request(f"b{i}", [1], tenant="b") for i in range(2)]
    for request in (*a, *b):
        queue.add(request)
    assert len(queue) == 5 and a[1] in queue
    queue.remove(a[1])  # an abort in the middle of a tenant
    queue.remove(b[0])  # an abort at the head of a tenant
    assert len(queue) == 3 and a[1] not in queue and b[0] not in queue
    # Passing over a request (a sibling still waiting for its prompt) offers its tenant's next one:
    # that tenant has had no turn yet. Each request is offered once per pass.
    assert list(queue.in_admission_order()) == [a[0], a[2], b[1]]
    order = queue.in_admission_order()
    assert next(order) is a[0]
    queue.admit(a[0])
    assert next(order) is b[1]  # b has had no admission yet, a has had one
    order.close()
    queue.remove(b[1])
    assert list(queue.in_admission_order()) == [a[2]]
    queue.admit(a[2])
    assert len(queue) == 0 and list(queue) == [] and list(queue.in_admission_order()) == []


def test_waiting_queue_admits_by_least_service_under_random_arrivals_and_aborts(make_request):
    """Against a plain model of start-time fair queuing: each tenant has a tag (admissions it has
    had, counted from the virtual time at which it last started waiting); the next admission goes
    to the least tag, then the oldest first request; a tenant's own requests go in arrival order."""
    rng = random.Random(7)
    queue = WaitingQueue()
    waiting: dict[str, list] = {}
    tags: dict[str, int] = {}
    virtual_time = 0
    ids = iter(range(10**6))
    for _ in range(5000):
        action = rng.random()
        if action < 0.5:
            tenant = f"t{rng.randrange(6)}"
            request = make_request(f"{tenant}/{next(ids)}", [1], tenant=tenant)
            if not waiting.get(tenant):
                tags[tenant] = max(tags.get(tenant, 0), virtual_time)
            queue.add(request)
            waiting.setdefault(tenant, []).append(request)
        elif action < 0.6 and any(waiting.values()):
            tenant = rng.choice(sorted(t for t, requests in waiting.items() if requests))
            queue.remove(waiting[tenant].pop(rng.randrange(len(waiting[tenant]))))
        elif any(waiting.values()):
            expected = min((t for t, requests in waiting.items() if requests),
                           key=lambda t: (tags[t], waiting[t][0].arrival_time))
            order = queue.in_admission_order()
            request = next(order)
            order.close()
            assert request is waiting[expected][0]
            queue.admit(request)
            waiting[expected].pop(0)
            virtual_time = max(virtual_time, tags[expected])
            tags[expected] += 1
        assert len(queue) == sum(map(len, waiting.values()))
        if not len(queue):  # nobody waits: the model starts over, as the queue does
            tags, virtual_time = {}, 0


# -- the real engine ------------------------------------------------------------------------------


def run_batch_then_late_small_call(folder, *, with_tenants: bool):
    """16 greedy prompts of tenant "big" (4 run at a time), then after 3 steps one short call of
    tenant "small". Returns every request's tokens and how many of big's were unfinished when
    small finished."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", max_num_seqs=4, num_gpu_blocks_override=64))
    rng = random.Random(0)
    for i in range(16):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randrange(4, 12))]
        engine.add_request(f"big{i}", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                           tenant="big" if with_tenants else None)
    for _ in range(3):
        engine.step()
    engine.add_request("small", [17, 93, 41, 200, 6], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       tenant="small" if with_tenants else None)
    tokens, big_unfinished_at_small = {}, None
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = list(output.outputs[0].token_ids)
                if output.request_id == "small":
                    big_unfinished_at_small = engine.get_num_unfinished_requests()
    assert not engine.has_unfinished_requests() and len(tokens) == 17
    return tokens, big_unfinished_at_small


def test_engine_finishes_a_late_small_call_while_another_tenants_batch_runs(tiny_hf_checkpoint):
    folder, _ = tiny_hf_checkpoint("llama")
    fair_tokens, big_left = run_batch_then_late_small_call(folder, with_tenants=True)
    assert big_left >= 8, f"the small call finished only when {big_left} of the batch's 16 were left"
    fifo_tokens, big_left_fifo = run_batch_then_late_small_call(folder, with_tenants=False)
    assert big_left_fifo <= 2, "as one tenant (FIFO) the small call waits behind the batch"
    assert fair_tokens == fifo_tokens, "greedy outputs depend on the fair order"
