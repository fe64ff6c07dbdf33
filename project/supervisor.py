"""Runs N daphne web processes on one listening socket and keeps N running.

One daphne is one event loop on one core; more cores want more processes. This process binds the
socket once and each worker adopts it (`daphne --fd`), so the kernel hands every new connection to
whichever worker accepts it first, and a worker that dies takes only its own connections with it.
It imports neither Django nor torch: it starts at once and has little that could crash.

    python -m project.supervisor --workers 4 --host 127.0.0.1 --port 8000

The workers' Prometheus counters add up across them: each writes its own to files in
PROMETHEUS_MULTIPROC_DIR (a fresh temporary folder unless set), emptied at start, and any worker's
/metrics sums all of them (inference/metrics.py).

Daphne's defaults suit long SSE streams, so none is changed: no HTTP timeout (`--http-timeout`
unset), websockets pinged every 20 s and closed after a day, and an application gets 10 s to finish
after its client disconnects (`--application-close-timeout`), enough to abort and settle its calls.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.local_services import die_with_parent

logger = logging.getLogger("supervisor")

REPO_ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 20  # how long SIGTERMed workers get to close their connections before SIGKILL
QUICK_EXIT_S = 5  # a worker gone this soon after its start crashed: it was not killed mid-work
MAX_QUICK_EXITS = 3  # in a row: something (settings, code, database) is broken, restarting won't help
POLL_S = 0.2  # how soon a dead worker or a stop signal is noticed


def listening_socket(host: str, port: int) -> socket.socket:
    """The one socket every worker accepts on (IPv4: daphne's `--fd` adopts AF_INET sockets)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)  # the kernel caps it at net.core.somaxconn
    return sock


@dataclass
class Worker:
    number: int
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, *, workers: int, sock: socket.socket, verbosity: int) -> None:
        self.count, self.sock, self.verbosity = workers, sock, verbosity
        self.workers: dict[int, Worker] = {}
        self.quick_exits = 0
        self.stop_signal: int | None = None

    def run(self) -> int:
        """Start the workers, replace any that dies, and return the exit status."""
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a shell's background job leaves Ctrl-C
            signal.signal(signal.SIGINT, self._on_stop_signal)     # to the shell (scripts/serve TERMs us)
        host, port = self.sock.getsockname()
        logger.info("serving http://%s:%d with %d workers", host, port, self.count)
        made_metrics_dir = prepare_metrics_dir()
        try:
            for number in range(1, self.count + 1):
                self._start(number)
            while self.stop_signal is None:
                for worker in [w for w in self.workers.values() if w.process.poll() is not None]:
                    if not self._replace(worker):
                        self._stop_all()
                        return 1
                time.sleep(POLL_S)
            logger.info("got %s; stopping the workers", signal.Signals(self.stop_signal).name)
            self._stop_all()
            return 0
        finally:
            if made_metrics_dir:
                shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)

    def _on_stop_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def _start(self, number: int) -> None:
        command = [sys.executable, "-m", "daphne", "--fd", str(self.sock.fileno()), "-v", str(self.verbosity),
                   "project.asgi:application"]
        process = subprocess.Popen(command, cwd=REPO_ROOT, pass_fds=[self.sock.fileno()],
                                   preexec_fn=die_with_parent)
        self.workers[number] = Worker(number, process)
        logger.info("worker %d started (pid %d)", number, process.pid)

    def _replace(self, worker: Worker) -> bool:
        """Start a worker in the place of one that exited; False when they keep crashing at start."""
        quick = time.monotonic() - worker.started < QUICK_EXIT_S
        self.quick_exits = self.quick_exits + 1 if quick else 0
        if self.quick_exits >= MAX_QUICK_EXITS:
            logger.error("worker %d (pid %d) exited with status %d within %d s of its start (%d such exits "
                         "in a row): workers crash at start; stopping (see their errors above)", worker.number,
                         worker.process.pid, worker.process.returncode, QUICK_EXIT_S, self.quick_exits)
            return False
        logger.warning("worker %d (pid %d) exited with status %d; starting a replacement", worker.number,
                       worker.process.pid, worker.process.returncode)
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.process.pid)  # its live gauges go; its counters still count
        time.sleep(0.5 * self.quick_exits)  # a short backoff while workers crash at start
        if self.stop_signal is None:
            self._start(worker.number)
        return True

    def _stop_all(self) -> None:
        """SIGTERM every worker, SIGKILL whatever is still running GRACE_S later."""
        processes = [w.process for w in self.workers.values() if w.process.poll() is None]
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + GRACE_S
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("worker pid %d did not stop within %d s; killing it", process.pid, GRACE_S)
                process.kill()
                process.wait()
        logger.info("stopped")


def prepare_metrics_dir() -> bool:
    """PROMETHEUS_MULTIPROC_DIR for the workers (inherited through the environment), emptied of an
    earlier run's files; True when this process made the folder (and removes it at the end)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llm-web-metrics-")
        return True
    Path(path).mkdir(parents=True, exist_ok=True)
    for stale in Path(path).glob("*.db"):
        stale.unlink()
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m project.supervisor",
        description="Run N daphne workers of the project on one listening socket; restart any that dies. "
                    "SIGTERM or SIGINT stops them all (exit 0); exits 1 when workers keep crashing at start.")
    parser.add_argument("--workers", type=int,
                        default=int(os.environ.get("WEB_WORKERS") or 0) or len(os.sched_getaffinity(0)),
                        help="how many web processes (default $WEB_WORKERS, else the number of CPUs)")
    parser.add_argument("--host", default="127.0.0.1", help="IPv4 address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="for the supervisor and its workers (their $LOG_LEVEL); INFO and DEBUG keep "
                             "daphne's access log (default $LOG_LEVEL, else INFO)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s supervisor: %(message)s")
    os.environ["LOG_LEVEL"] = args.log_level
    try:
        sock = listening_socket(args.host, args.port)
    except OSError as error:
        parser.exit(1, f"supervisor: cannot listen on {args.host}:{args.port}: {error}\n")
    verbosity = 1 if logging.getLevelName(args.log_level) <= logging.INFO else 0
    return Supervisor(workers=args.workers, sock=sock, verbosity=verbosity).run()


if __name__ == "__main__":
    sys.exit(main())
