"""The stream pacer: coarser streaming only while the host, not the device, sets the pace."""

from engine.service.stream_pacing import StreamPacer


def run_steps(pacer: StreamPacer, count: int, step_s: float, waited_s: float) -> list[int]:
    """The intervals the pacer switched to over `count` steps of the given shape."""
    return [i for i in (pacer.observe(step_s, waited_s) for _ in range(count)) if i is not None]


def test_a_host_bound_replica_coalesces_up_to_the_cap_and_returns_when_the_device_is_slower():
    pacer = StreamPacer(base_interval=1, max_interval=3, window=4, patience=2)
    assert run_steps(pacer, 3, 0.048, 0.0) == []  # no decision before a whole window
    assert run_steps(pacer, 1, 0.048, 0.0) == [2]
    assert run_steps(pacer, 8, 0.045, 0.0005) == [3]  # still host-bound: up to the cap, no further
    assert run_steps(pacer, 8, 0.045, 0.0) == []
    assert run_steps(pacer, 4, 0.041, 0.005) == []  # a little room: stays (no flapping)
    assert run_steps(pacer, 4, 0.041, 0.015) == []  # clear room, but once: coarser streaming may be why
    assert run_steps(pacer, 4, 0.045, 0.0) == []  # host-bound again: patience starts over (already at the cap)
    assert run_steps(pacer, 4, 0.041, 0.015) == []
    assert run_steps(pacer, 4, 0.041, 0.015) == [2]  # two windows in a row
    assert run_steps(pacer, 8, 0.041, 0.015) == [1]
    assert run_steps(pacer, 16, 0.041, 0.015) == []  # never below the configured interval
    assert pacer.interval == 1


def test_the_configured_interval_is_the_floor_and_a_cap_below_it_changes_nothing():
    pacer = StreamPacer(base_interval=4, max_interval=2, window=2)
    assert pacer.interval == 4
    assert run_steps(pacer, 6, 0.05, 0.0) == []
    assert run_steps(pacer, 6, 0.05, 0.04) == []
    assert pacer.interval == 4


def test_one_slow_step_inside_a_window_is_averaged_not_acted_on():
    pacer = StreamPacer(base_interval=1, max_interval=2, window=4)
    # Three steps with a clear wait and one long host-bound step (a burst of admissions).
    waits = [(0.012, 0.003), (0.012, 0.003), (0.060, 0.0), (0.012, 0.003)]
    assert [pacer.observe(*w) for w in waits] == [None, None, None, None]
    assert pacer.interval == 1
