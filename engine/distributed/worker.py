"""Ranks 1..N-1: processes that run the same ModelRunner steps as rank 0 on their own shard.

Rank 0 owns the scheduler. Each step it sends every worker the step contract (SchedulerOutput)
over a pipe (not a collective: a pipe may wait idle for hours, and breaks at once when either end
dies); every rank keeps its own request states from it, all ranks run the step's forward together,
meeting in the collectives, and rank 0 samples and broadcasts the tokens. A worker launches each
step before fetching the previous one, as rank 0 does under async scheduling.
A worker that dies or raises takes the engine down: a watchdog thread on rank 0 sees it at once,
records the error and, on NCCL, aborts the group so a collective waiting on the dead peer fails
(gloo fails by itself once the peer's socket closes); rank 0 then raises that clear error. Should
rank 0 still be blocked STUCK_STEP_GRACE_S later, the process exits rather than hang. Workers exit
when rank 0 goes, however it goes.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import threading
import time
import traceback
from contextlib import contextmanager
from multiprocessing.connection import wait

from engine.distributed import parallel_state
from engine.errors import EngineDeadError

logger = logging.getLogger(__name__)

# After a worker dies, how long rank 0 may stay blocked in a collective with it before the process
# exits: an aborted NCCL group normally frees it at once; a hang is worse than an exit.
STUCK_STEP_GRACE_S = 30.0


def worker_main(rank: int, world_size: int, port: int, steps, runner_args: tuple) -> None:
    """A worker's whole life: join the group, load its shard, run steps until told to stop."""
    from engine.worker.model_runner import ModelRunner

    config = runner_args[0]
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        parallel_state.init_tensor_parallel(rank, world_size, port, config.device)
        runner = ModelRunner(*runner_args)
        previous = None
        while (step := steps.recv()) is not None:
            launched = runner.launch(step)
            if previous is not None:
                runner.fetch(previous)
            previous = launched
    except EOFError:
        os._exit(0)  # rank 0 is gone: leaving the group would wait on it
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    parallel_state.destroy_tensor_parallel()


def _exit_with_parent(parent_pid: int) -> None:
    """Rank 0 may die in a collective (or be SIGKILLed); a worker blocked there must not outlive it."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


class TensorParallelWorkers:
    """Rank 0's handle on ranks 1..N-1; joins rank 0 to the group when the workers start."""

    def __init__(self, world_size: int, runner_args: tuple) -> None:
        port = parallel_state.free_port()
        context = multiprocessing.get_context("spawn")  # CUDA and torch threads survive no fork
        self.pipes, self.processes = [], []
        for rank in range(1, world_size):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=worker_main, args=(rank, world_size, port, receiver, runner_args),
                                      name=f"tp-worker-{rank}", daemon=True)
            process.start()
            receiver.close()
            self.pipes.append(sender)
            self.processes.append(process)
        self.error: str | None = None
        self._stopping = False
        self._step_started: float | None = None  # when the step in flight began
        self._reaping = threading.Lock()
        threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()
        atexit.register(self.shutdown)  # before multiprocessing's own exit hook kills the workers
        try:
            parallel_state.init_tensor_parallel(0, world_size, port, runner_args[0].device)
        except BaseException:
            self.shutdown()
            raise

    def launch(self, runner, scheduler_output):
        """Start one step on every rank; rank 0's runner returns the launched step."""
        if self.error is None:
            self._find_dead_worker(wait_s=0)
        if self.error is not None:
            raise EngineDeadError(self.error)
        with self._stepping():
            for pipe in self.pipes:
                pipe.send(scheduler_output)
            return runner.launch(scheduler_output)

    def sample_constrained(self, runner, launched, bitmask) -> None:
        """Rank 0 samples a step that waited for its grammar masks (the others wait in the broadcast)."""
        with self._stepping():
            runner.sample_constrained(launched, bitmask)

    def fetch(self, runner, launched):
        with self._stepping():
            return runner.fetch(launched)

    @contextmanager
    def _stepping(self):
        self._step_started = time.monotonic()
        try:
            yield
        except Exception as error:
            # The ranks are out of step now: whatever happened, this engine cannot go on.
            self._find_dead_worker(wait_s=5.0)
            self.error = self.error or f"tensor-parallel step failed on rank 0 ({error}); the engine is down"
            self.shutdown()
            raise EngineDeadError(self.error) from error
        finally:
            self._step_started = None

    def _watch(self) -> None:
        """Wait for a worker to die (or for shutdown); then record why and unblock rank 0."""
        sentinels = [process.sentinel for process in self.processes]
        while self.error is None:
            if self._stopping:
                return
            if wait(sentinels, timeout=0.5):
                self._find_dead_worker(wait_s=5.0)
        if self._stopping:
            return
        logger.error("%s", self.error)
        parallel_state.abort_collectives()
        deadline = time.monotonic() + STUCK_STEP_GRACE_S
        while self._step_started is not None:
            if time.monotonic() > deadline:
                logger.critical("rank 0 is still blocked in a collective with the dead worker; exiting")
                os._exit(1)
            time.sleep(0.1)

    def _find_dead_worker(self, wait_s: float) -> None:
        """Record the first dead worker as the engine's error, waiting up to `wait_s` for one to die.
        Polls: a child can close its pipes a moment before it can be reaped. One thread at a time:
        two reaping the same child at once can each see it alive."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._reaping:
                for rank, process in enumerate(self.processes, start=1):
                    if self.error is None and not self._stopping and not process.is_alive():
                        self.error = (f"tensor-parallel worker rank {rank} died (exit code {process.exitcode}); "
                                      "the engine is down, start a new one")
            remaining = deadline - time.monotonic()
            if self.error is not None or self._stopping or remaining <= 0:
                return
            wait([process.sentinel for process in self.processes], timeout=min(remaining, 0.05))

    def shutdown(self) -> None:
        """Stop the workers and leave the group with them, or by force when one has died."""
        atexit.unregister(self.shutdown)
        self._stopping = True
        with self._reaping:
            healthy = self.error is None and all(process.is_alive() for process in self.processes)
            # A step now would run on rank 0 alone, its shards never summed: refuse it instead.
            self.error = self.error or "the tensor-parallel engine was shut down"
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
            pipe.close()
        if not healthy:
            parallel_state.abort_collectives()
        # Leave now, while the workers leave too: NCCL's teardown waits for every rank of the group.
        parallel_state.destroy_tensor_parallel()
        for process in self.processes:
            process.join(timeout=30 if healthy else 2)
            if process.is_alive():
                process.kill()
                process.join()
        self.pipes, self.processes = [], []
