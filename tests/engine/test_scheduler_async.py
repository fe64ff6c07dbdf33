"""Async scheduling at the scheduler level: the next step is planned before the previous one's
tokens are known (`schedule()` again before `update()`), as the engine does when it overlaps
planning with the model's forward pass.

The fake model samples the token at position p of request r as a fixed function of (r, p), like a
deterministic model would, so a run that schedules ahead must end exactly where the plain
schedule/update/schedule/update run ends. `make_scheduler` and `make_request` come from conftest.py.
"""

import collections
import pickle

import pytest

from engine.request import RequestStatus

EOS = 2


def assert_all_blocks_free(scheduler):
    manager = scheduler.kv_cache_manager
    assert not manager.request_ids()
    assert manager.num_free_blocks == manager.block_pool.num_blocks - 1
    assert all(block.ref_cnt == 0 for block in manager.block_pool.blocks[1:])


class FakeModel:
    """Plays the model runner: samples for exactly `output.sampling_req_ids`. The token a request
    samples in a step lies at position `num_computed_tokens` as schedule() left it (the position
    after the step's last one), so `sample` must run right after the schedule() that made the
    output, before the next one. Each (request, position) may be sampled only once: a token
    sampled twice means the scheduler planned the same position twice."""

    def __init__(self, special=None):
        self.special = special or {}  # (request id, position) -> token, e.g. an EOS
        self.sampled = collections.Counter()

    def token_at(self, request_id, position):
        return self.special.get((request_id, position), 10 + (sum(map(ord, request_id)) * 31 + position * 7) % 90)

    def plan(self, scheduler):
        """One schedule() and the tokens its step samples: (output, tokens)."""
        output = scheduler.schedule()
        return output, self.sample(scheduler, output)

    def sample(self, scheduler, output):
        assert output.sampling_req_ids <= output.num_scheduled_tokens.keys()
        tokens = {}
        for request_id in output.num_scheduled_tokens:  # batch order
            if request_id in output.sampling_req_ids:
                position = scheduler.requests[request_id].num_computed_tokens
                self.sampled[request_id, position] += 1
                assert self.sampled[request_id, position] == 1, f"{request_id} sampled position {position} twice"
                tokens[request_id] = self.token_at(request_id, position)
        return tokens


class Progress:
    """What the runner has been told so far in a run: where each request's planned tokens end,
    and which requests it has been told to forget."""

    def __init__(self):
        self.planned_until = {}
        self.forgotten = set()


def schedule_checked(scheduler, progress):
    """schedule(), checking the step contract against the scheduler's state around it: the output
    survives a pickle round trip, a request the runner holds gets only the blocks it did not have,
    a new one all of its blocks, every request's tokens continue where its last step ended (no
    position planned twice), and a finished request is named once."""
    manager = scheduler.kv_cache_manager
    held = {request_id: manager.get_block_ids(request_id) for request_id in manager.request_ids()}
    output = scheduler.schedule()
    assert pickle.loads(pickle.dumps(output)) == output

    for request_id in output.preempted_req_ids:
        assert not manager.holds(request_id) and request_id not in output.num_scheduled_tokens
        progress.planned_until.pop(request_id, None)
    for request_id in output.finished_req_ids:
        assert request_id not in scheduler.requests and request_id not in output.num_scheduled_tokens
        assert request_id not in progress.forgotten, f"{request_id} named as finished twice"
        progress.forgotten.add(request_id)
        progress.planned_until.pop(request_id, None)
    new_ids = [data.req_id for data in output.new_requests]
    cached_ids = [data.req_id for data in output.cached_requests]
    assert len(set(new_ids + cached_ids)) == len(new_ids) + len(cached_ids)
    assert set(new_ids + cached_ids) == output.num_scheduled_tokens.keys()
    for data in output.cached_requests:
        assert data.req_id in held, "a request the runner does not hold must come as a new request"
        assert data.first_new_block == len(held[data.req_id][0])
        assert tuple(a + list(b) for a, b in zip(held[data.req_id], data.new_block_ids)) == manager.get_block_ids(
            data.req_id)
        if data.req_id in progress.planned_until:  # (drive() may take over a run begun by hand)
            assert data.num_computed_tokens == progress.planned_until[data.req_id], (
                "a position was planned twice, or skipped")
    for data in output.new_requests:
        request = scheduler.requests[data.req_id]
        assert data.block_ids == manager.get_block_ids(data.req_id)
        assert data.prompt_token_ids + data.output_token_ids == request.all_token_ids
        assert request.num_output_placeholders == int(data.req_id in output.sampling_req_ids)
    for request_id, num_new in output.num_scheduled_tokens.items():
        request = scheduler.requests[request_id]
        assert num_new >= 1
        assert request.num_computed_tokens <= request.num_tokens_with_placeholders
        if request_id in progress.planned_until:
            assert request.num_computed_tokens == progress.planned_until[request_id] + num_new
        progress.planned_until[request_id] = request.num_computed_tokens
    return output


def drive(scheduler, model, ahead, progress=None, max_steps=2000):
    """Run to completion planning up to `ahead` steps beyond the one being updated, in the
    engine's order (schedule step N + 1, then update step N); ahead=0 is the plain synchronous
    loop. Returns (outputs, finished requests in the order update() returned them)."""
    in_flight = collections.deque()
    outputs, finished = [], []
    progress = Progress() if progress is None else progress
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests() and not in_flight:
            assert scheduler.steps_in_flight() == 0
            return outputs, finished
        output = schedule_checked(scheduler, progress) if scheduler.has_unfinished_requests() else None
        if output is not None and not output.is_empty():
            in_flight.append((output, model.sample(scheduler, output)))
            outputs.append(output)
        else:
            assert in_flight, "scheduler has unfinished requests but scheduled nothing, with no step in flight"
        while in_flight and (len(in_flight) > ahead or output is None or output.is_empty()):
            done, tokens = in_flight.popleft()
            finished += scheduler.update(done, tokens)
            if output is None or output.is_empty():
                break
    raise AssertionError(f"scheduler did not finish within {max_steps} steps")


def outcome(requests):
    return {r.request_id: (r.output_token_ids, r.status, r.stop_reason) for r in requests}


# -- scheduling one step ahead ------------------------------------------------------------------


def test_a_second_schedule_before_update_plans_one_token_per_decoding_request(make_scheduler, make_request):
    def run(synchronous):
        scheduler = make_scheduler()
        model = FakeModel()
        # "b" needs a new block for the position s1 computes, "a" for the one s2 computes.
        requests = [make_request("a", range(1, 8), max_tokens=8), make_request("b", range(20, 28), max_tokens=8)]
        for request in requests:
            scheduler.add_request(request)
        first = scheduler.schedule()
        scheduler.update(first, model.sample(scheduler, first))
        assert [r.num_output_tokens for r in requests] == [1, 1]
        if synchronous:
            for _ in range(2):
                output = scheduler.schedule()
                scheduler.update(output, model.sample(scheduler, output))
            return requests, scheduler, model

        blocks_before = {r.request_id: scheduler.kv_cache_manager.get_block_ids(r.request_id) for r in requests}
        s1, tokens1 = model.plan(scheduler)
        s2 = scheduler.schedule()  # before update(s1): the decodes continue at their placeholders
        tokens2 = model.sample(scheduler, s2)
        assert scheduler.steps_in_flight() == 2
        for output, ahead in ((s1, 0), (s2, 1)):
            assert output.num_scheduled_tokens == {"a": 1, "b": 1}
            assert output.sampling_req_ids == {"a", "b"}
            assert output.new_requests == [] and output.preempted_req_ids == []
            for data in output.cached_requests:
                request = scheduler.requests[data.req_id]
                # s1 computes the known token (position prompt + 0), s2 the one s1 samples.
                assert data.num_computed_tokens == request.num_prompt_tokens + ahead
        for request in requests:
            assert request.num_output_tokens == 1 and request.num_output_placeholders == 2
            assert request.num_computed_tokens == request.num_prompt_tokens + 2
            assert request.num_tokens_with_placeholders == request.num_computed_tokens + 1
            # Running requests get only their new blocks; together they are what the request holds.
            (blocks,) = scheduler.kv_cache_manager.get_block_ids(request.request_id)
            new = [b for s in (s1, s2) for d in s.cached_requests if d.req_id == request.request_id
                   for b in d.new_block_ids[0]]
            assert blocks_before[request.request_id][0] + new == blocks
            assert len(blocks) == len(blocks_before[request.request_id][0]) + 1

        assert scheduler.update(s1, tokens1) == []
        assert [r.num_output_placeholders for r in requests] == [1, 1]
        assert scheduler.update(s2, tokens2) == []
        for request in requests:
            assert request.num_output_placeholders == 0
            p = request.num_prompt_tokens
            assert request.output_token_ids == [model.token_at(request.request_id, p + i) for i in range(3)]
        return requests, scheduler, model

    async_requests, async_scheduler, async_model = run(synchronous=False)
    sync_requests, sync_scheduler, sync_model = run(synchronous=True)
    assert outcome(async_requests) == outcome(sync_requests)
    drive(async_scheduler, async_model, ahead=1)
    drive(sync_scheduler, sync_model, ahead=0)
    assert outcome(async_requests) == outcome(sync_requests)
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED and r.num_output_tokens == 8 for r in async_requests)
    assert_all_blocks_free(async_scheduler)


@pytest.mark.parametrize("ahead", [1, 2])
@pytest.mark.parametrize("pool", ["roomy", "tiny"])
def test_scheduling_ahead_ends_where_the_synchronous_loop_ends(make_scheduler, make_request, ahead, pool):
    """A mixed load: chunked prefills, decodes, stops on EOS and on stop ids, max_tokens and
    max_model_len, min_tokens; with a tiny KV pool, preemptions too."""

    def run(ahead):
        num_blocks = 200 if pool == "roomy" else 14
        scheduler = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=24, max_num_seqs=6,
                                   max_model_len=40, long_prefill_token_threshold=8, enable_caching=pool == "roomy")
        requests = []
        for i in range(12):
            prompt = [(i * 13 + k * 5) % 97 + 3 for k in range(3 + (i * 7) % 17)]
            params = dict(max_tokens=4 + (i * 5) % 23, min_tokens=2 if i % 4 == 0 else 0)
            if i % 3 == 1:
                params["stop_token_ids"] = [50]
            request = make_request(f"r{i}", prompt, arrival_time=float(i), **params)
            request.sampling_params.all_stop_token_ids = {EOS}
            requests.append(request)
            scheduler.add_request(request)
        # Some requests meet an EOS, or a stop id, early on (one inside its min_tokens).
        num_prompt = [r.num_prompt_tokens for r in requests]
        special = {("r0", num_prompt[0]): EOS, ("r0", num_prompt[0] + 2): EOS, ("r4", num_prompt[4] + 3): EOS,
                   ("r7", num_prompt[7] + 1): 50, ("r9", num_prompt[9] + 5): EOS}
        model = FakeModel(special)
        outputs, finished = drive(scheduler, model, ahead)
        assert sorted(r.request_id for r in finished) == sorted(r.request_id for r in requests), "finished once each"
        assert_all_blocks_free(scheduler)
        return requests, outputs, scheduler

    async_requests, async_outputs, async_scheduler = run(ahead)
    sync_requests, _, sync_scheduler = run(0)
    assert outcome(async_requests) == outcome(sync_requests)
    statuses = {r.status for r in async_requests}
    assert statuses == {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED}
    assert async_requests[0].output_token_ids[-1] == EOS and async_requests[0].num_output_tokens == 3  # min_tokens
    assert any(len(o.num_scheduled_tokens) > 1 and o.sampling_req_ids for o in async_outputs)
    assert any(o.num_scheduled_tokens.keys() - o.sampling_req_ids for o in async_outputs), "no prefill chunk"
    if pool == "tiny":
        assert async_scheduler.num_preemptions > 0 and sync_scheduler.num_preemptions > 0


@pytest.mark.parametrize("limit", ["max_tokens", "max_model_len"])
def test_scheduling_ahead_never_plans_past_the_last_token(make_scheduler, make_request, limit):
    """Three tokens allowed: once the step sampling the third is in flight, the step planned
    ahead leaves the request out; it finishes with exactly three tokens and frees its blocks."""
    if limit == "max_tokens":
        scheduler = make_scheduler()
        capped = make_request("capped", range(1, 6), max_tokens=3)
    else:
        scheduler = make_scheduler(max_model_len=8)  # 5 prompt tokens + 3
        capped = make_request("capped", range(1, 6), max_tokens=100)
    other = make_request("other", range(11, 13), max_tokens=6)
    scheduler.add_request(capped)
    scheduler.add_request(other)
    model = FakeModel()

    s0, tokens0 = model.plan(scheduler)
    s1, tokens1 = model.plan(scheduler)
    assert scheduler.update(s0, tokens0) == []
    s2, tokens2 = model.plan(scheduler)
    for output in (s0, s1, s2):
        assert "capped" in output.sampling_req_ids
    assert scheduler.update(s1, tokens1) == []
    assert capped.num_output_tokens == 2 and capped.num_output_placeholders == 1  # its third token is in flight

    s3, tokens3 = model.plan(scheduler)
    assert "capped" not in s3.num_scheduled_tokens, "planned past its last token"
    assert s3.num_scheduled_tokens == {"other": 1}
    assert capped.status == RequestStatus.RUNNING and scheduler.kv_cache_manager.get_block_ids("capped")
    assert capped.num_computed_tokens == 5 + 2  # its third token is never computed

    assert scheduler.update(s2, tokens2) == [capped]
    assert capped.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert capped.output_token_ids == [model.token_at("capped", 5 + i) for i in range(3)]
    assert capped.num_output_placeholders == 0
    assert not scheduler.kv_cache_manager.holds("capped") and "capped" not in scheduler.requests
    s4 = scheduler.schedule()
    assert "capped" in s4.finished_req_ids and "capped" not in s4.num_scheduled_tokens
    tokens4 = model.sample(scheduler, s4)
    assert scheduler.update(s3, tokens3) == []
    scheduler.update(s4, tokens4)
    drive(scheduler, model, ahead=1)
    assert capped.num_output_tokens == 3
    assert other.status == RequestStatus.FINISHED_LENGTH_CAPPED and other.num_output_tokens == 6
    assert_all_blocks_free(scheduler)
    assert sum(1 for (request_id, _) in model.sampled if request_id == "capped") == 3


def test_a_token_after_eos_from_the_step_ahead_is_dropped(make_scheduler, make_request):
    scheduler = make_scheduler()
    stops = make_request("stops", range(1, 6), max_tokens=10)
    goes_on = make_request("goes-on", range(11, 16), max_tokens=9)
    for request in (stops, goes_on):
        request.sampling_params.all_stop_token_ids = {EOS}
        scheduler.add_request(request)
    model = FakeModel({("stops", 6): EOS})  # its second output token
    progress = Progress()

    s0 = schedule_checked(scheduler, progress)
    scheduler.update(s0, model.sample(scheduler, s0))
    s1 = schedule_checked(scheduler, progress)  # samples the EOS
    tokens1 = model.sample(scheduler, s1)
    s2 = schedule_checked(scheduler, progress)  # planned before the EOS is known: samples one more for "stops"
    tokens2 = model.sample(scheduler, s2)
    assert "stops" in s2.sampling_req_ids and tokens1["stops"] == EOS

    assert scheduler.update(s1, tokens1) == [stops]
    assert stops.status == RequestStatus.FINISHED_STOPPED
    assert stops.output_token_ids == [model.token_at("stops", 5), EOS]
    assert not scheduler.kv_cache_manager.holds("stops") and "stops" not in scheduler.requests
    assert stops not in scheduler.running
    s3 = schedule_checked(scheduler, progress)  # in the engine's order: planned before update(s2)
    tokens3 = model.sample(scheduler, s3)
    assert s3.finished_req_ids == {"stops"}, "the runner must forget it"
    assert "stops" not in s3.num_scheduled_tokens

    assert stops not in scheduler.update(s2, tokens2)
    assert stops.output_token_ids == [model.token_at("stops", 5), EOS], "the token after EOS was appended"
    assert stops.num_output_placeholders == 0 and stops.status == RequestStatus.FINISHED_STOPPED
    finished = scheduler.update(s3, tokens3)
    outputs, more = drive(scheduler, model, ahead=1, progress=progress)  # checks "named as finished once"
    assert len(outputs) >= 3 and goes_on in more
    assert stops not in finished + more
    assert all("stops" not in o.num_scheduled_tokens for o in outputs)
    assert goes_on.status == RequestStatus.FINISHED_LENGTH_CAPPED and goes_on.num_output_tokens == 9
    assert_all_blocks_free(scheduler)


def test_abort_while_two_steps_are_in_flight(make_scheduler, make_request):
    scheduler = make_scheduler()
    request = make_request("r", range(1, 9), max_tokens=20)
    scheduler.add_request(request)
    model = FakeModel()
    s0, tokens0 = model.plan(scheduler)
    s1, tokens1 = model.plan(scheduler)
    assert request.num_output_placeholders == 2
    assert scheduler.finish_requests("r", RequestStatus.FINISHED_ABORTED) == [request]
    assert_all_blocks_free(scheduler)
    assert scheduler.update(s0, tokens0) == [] and scheduler.update(s1, tokens1) == []
    assert request.output_token_ids == [] and request.num_output_placeholders == 0
    assert scheduler.steps_in_flight() == 0 and not scheduler.has_unfinished_requests()
    assert scheduler.schedule().is_empty()  # an empty step reaches no runner: it names nobody...
    scheduler.add_request(make_request("next", [5, 6, 7]))
    assert scheduler.schedule().finished_req_ids == {"r"}  # ...the next real step does


def test_preemption_while_a_step_is_in_flight_keeps_that_steps_token(make_scheduler, make_request):
    def run(ahead):
        # 6 usable blocks of 4 tokens; three 7-token prompts take 2 blocks each and fill the pool.
        scheduler = make_scheduler(num_blocks=7, block_size=4, enable_caching=False)
        requests = [make_request(f"r{i}", range(10 * i + 1, 10 * i + 8), max_tokens=6) for i in range(3)]
        for request in requests:
            scheduler.add_request(request)
        return scheduler, requests

    scheduler, requests = run(1)
    victim = requests[2]
    model = FakeModel()
    s0, tokens0 = model.plan(scheduler)
    s1 = scheduler.schedule()  # position 7 still fits the second block
    tokens1 = model.sample(scheduler, s1)
    assert s1.num_scheduled_tokens == {"r0": 1, "r1": 1, "r2": 1} and not s1.preempted_req_ids
    scheduler.update(s0, tokens0)
    s2 = scheduler.schedule()  # position 8 needs a third block: the latest goes, its s1 token in flight
    tokens2 = model.sample(scheduler, s2)
    assert s2.preempted_req_ids == ["r2"] and "r2" not in s2.num_scheduled_tokens
    assert victim.status == RequestStatus.PREEMPTED and victim in scheduler.waiting
    assert victim.num_computed_tokens == 0 and not scheduler.kv_cache_manager.holds("r2")
    assert victim.num_output_tokens == 1 and victim.num_output_placeholders == 1

    assert scheduler.update(s1, tokens1) == []
    assert victim.output_token_ids == [tokens0["r2"], tokens1["r2"]], "the in-flight step's token was lost"
    assert victim.num_output_placeholders == 0 and victim.status == RequestStatus.PREEMPTED
    s3, tokens3 = model.plan(scheduler)
    scheduler.update(s2, tokens2)
    scheduler.update(s3, tokens3)
    outputs, _ = drive(scheduler, model, ahead=1)
    # Readmitted as a new request with both tokens, all 9 tokens computed again before it samples.
    readmitted = [o for o in [s3, *outputs] if any(d.req_id == "r2" for d in o.new_requests)]
    assert readmitted and readmitted[0].num_scheduled_tokens["r2"] == 9
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED and r.num_output_tokens == 6 for r in requests)
    assert_all_blocks_free(scheduler)

    sync_scheduler, sync_requests = run(0)
    drive(sync_scheduler, FakeModel(), ahead=0)
    assert sync_scheduler.num_preemptions > 0
    assert outcome(requests) == outcome(sync_requests)


def test_a_request_preempted_with_a_token_in_flight_waits_for_it_before_readmission(make_scheduler, make_request):
    """Blocks free up at once, but the victim's token is not known yet: readmitting it would
    recompute a sequence that lacks its last token."""
    scheduler = make_scheduler(num_blocks=7, block_size=4, enable_caching=False)
    requests = [make_request(f"r{i}", range(10 * i + 1, 10 * i + 8), max_tokens=6) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    model = FakeModel()
    s0, tokens0 = model.plan(scheduler)
    s1, tokens1 = model.plan(scheduler)
    scheduler.update(s0, tokens0)
    s2 = scheduler.schedule()
    assert s2.preempted_req_ids == ["r2"]
    model.sample(scheduler, s2)
    scheduler.finish_requests(["r0", "r1"], RequestStatus.FINISHED_ABORTED)  # the whole pool is free now
    s3 = scheduler.schedule()
    assert s3.is_empty() and not s3.finished_req_ids  # kept for the next step the runner sees
    scheduler.update(s1, tokens1)
    s4 = scheduler.schedule()
    assert s4.num_scheduled_tokens == {"r2": 9} and [d.req_id for d in s4.new_requests] == ["r2"]
    assert s4.finished_req_ids == {"r0", "r1"}
    assert s4.new_requests[0].output_token_ids == [tokens0["r2"], tokens1["r2"]]


# -- the step contract --------------------------------------------------------------------------


def test_every_output_pickles_and_running_requests_get_only_new_blocks(make_scheduler, make_request):
    """schedule_checked checks both for every step; this run makes sure every kind of step occurs."""
    scheduler = make_scheduler(num_blocks=12, block_size=4, max_num_batched_tokens=16, long_prefill_token_threshold=8,
                               enable_caching=False)
    requests = [make_request(f"r{i}", range(10 * i + 1, 10 * i + 4 + 3 * i), max_tokens=5 + i) for i in range(6)]
    for request in requests:
        scheduler.add_request(request)
    model = FakeModel()
    outputs, finished = drive(scheduler, model, ahead=1)
    assert len(finished) == len(requests)
    assert any(o.new_requests for o in outputs)
    assert any(d.new_block_ids[0] for o in outputs for d in o.cached_requests), "no running request got a block"
    assert any(not d.new_block_ids[0] for o in outputs for d in o.cached_requests)
    assert any(d.first_new_block > 0 for o in outputs for d in o.cached_requests)
    assert any(o.preempted_req_ids for o in outputs)
    assert any(o.finished_req_ids for o in outputs)
    assert_all_blocks_free(scheduler)


def test_an_output_is_not_changed_by_later_updates(make_scheduler, make_request):
    scheduler = make_scheduler(num_blocks=7, block_size=4, enable_caching=False)
    requests = [make_request(f"r{i}", range(10 * i + 1, 10 * i + 8), max_tokens=6) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    model = FakeModel()
    snapshots = []
    for _ in range(12):
        output = scheduler.schedule()
        snapshots.append((output, pickle.dumps(output)))
        scheduler.update(output, model.sample(scheduler, output))
    if not any(o.preempted_req_ids for o, _ in snapshots):
        raise RuntimeError("no preemption: nothing is readmitted with output tokens")  # a real failure
    changed = [output.step_id for output, pickled in snapshots if pickle.loads(pickled) != output]
    assert not changed, f"steps {changed} changed after they were handed out"
