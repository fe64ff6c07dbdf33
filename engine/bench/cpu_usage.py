"""python -m engine.bench.cpu_usage: CPU use of every process on this machine over time, by role.

The serving benchmark puts the engine replica, the web workers, the load generator and Redis on one
host; when HTTP falls short of offline, this says which of them was short of CPU. Every interval it
reads /proc/<pid>/stat of every process (and /proc/<pid>/task/<tid>/stat of the engine processes,
whose main thread runs the engine loop while other threads move data to and from Redis under the
same GIL) and writes per-interval CPU, in percent of one core as `top` shows it:

    python -m engine.bench.cpu_usage --out cpu.json [--interval 0.5] [--duration S]

It stops at SIGTERM, SIGINT or after --duration, then writes the file and prints a summary.
`--summarize cpu.json [--between T0 T1]` prints the summary of a written file over part of it.
Sample times are `time.perf_counter()` (CLOCK_MONOTONIC: one clock for every process on the host),
so they line up with the serving benchmark's request records.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
ENGINE_ROLES = ("replica", "offline")  # processes whose threads are followed one by one
ROLES = ("replica", "offline", "web", "bench", "bench_client", "valkey", "other")


@dataclass(frozen=True)
class Stat:
    ticks: int  # utime + stime
    start: int  # ticks after boot: with the pid, tells a process from a later one with its number
    ppid: int
    comm: str


def read_stat(path: str) -> Stat | None:
    try:
        text = Path(path).read_text()
    except OSError:  # it ended meanwhile
        return None
    head, _, rest = text.rpartition(")")  # comm may hold spaces and parentheses
    fields = rest.split()  # fields[0] is field 3 (state) of proc(5)
    return Stat(int(fields[11]) + int(fields[12]), int(fields[19]), int(fields[1]), head.partition("(")[2])


def read_argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return []


def own_role(argv: list[str], comm: str) -> str:
    """A process's role from its command line alone (bench clients need their parent's role too)."""
    program = os.path.basename(argv[0]) if argv else comm
    if program.startswith(("valkey-server", "redis-server")) or comm.startswith(("valkey-server", "redis-server")):
        return "valkey"
    words = argv[1:]
    if program == "llm-engine" and words[:1] == ["serve"]:
        return "replica"
    if not program.startswith("python"):  # a wrapper (timeout, bash) that names a Python command
        return "other"
    pairs = set(zip(words, words[1:]))
    if ("engine", "serve") in pairs:
        return "replica"
    if ("engine.bench", "serve") in pairs:
        return "bench"
    if "engine.bench" in words:  # the offline throughput or latency run
        return "offline"
    if "daphne" in words or "project.supervisor" in words:
        return "web"
    return "other"


class Sampler:
    """Per-interval CPU of every process, grouped by role; the engine processes' threads one by one."""

    def __init__(self, exclude: set[int] | None = None) -> None:
        self.exclude = exclude if exclude is not None else {os.getpid()}
        self.processes: dict[int, dict] = {}  # pid -> role, comm, command, ppid (as first seen)
        self.thread_names: dict[int, dict[int, str]] = {}  # engine pid -> tid -> comm
        self.samples: list[dict] = []
        self._last: dict[int, Stat] = {}
        self._last_threads: dict[int, Stat] = {}
        self._last_time = self._last_uptime = self._last_host = None

    def sample(self) -> None:
        now, uptime, host = time.perf_counter(), _uptime(), _host_busy_ticks()
        stats = {pid: stat for pid in _pids() if pid not in self.exclude and (stat := read_stat(f"/proc/{pid}/stat"))}
        roles = self._roles(stats)
        threads = {(pid, tid): stat for pid, role in roles.items() if role in ENGINE_ROLES
                   for tid, stat in _thread_stats(pid).items()}
        if self._last_time is not None:
            self.samples.append(self._interval(now, stats, roles, threads, host))
        self._last, self._last_threads = stats, threads
        self._last_time, self._last_uptime, self._last_host = now, uptime, host

    def _roles(self, stats: dict[int, Stat]) -> dict[int, str]:
        for pid, stat in stats.items():
            known = self.processes.get(pid)
            # comm changes at exec, the start time does not: a child seen between fork and exec is read again
            if known is None or known["start"] != stat.start or known["comm"] != stat.comm:
                argv = read_argv(pid)
                self.processes[pid] = {"role": own_role(argv, stat.comm), "comm": stat.comm, "ppid": stat.ppid,
                                       "start": stat.start, "command": " ".join(argv)[:200]}
        roles = {pid: self.processes[pid]["role"] for pid in stats}
        for pid, stat in stats.items():  # multiprocessing's spawned load generators, not its resource tracker
            if roles.get(stat.ppid) == "bench" and "spawn_main" in self.processes[pid]["command"]:
                roles[pid] = self.processes[pid]["role"] = "bench_client"
        return roles

    def _interval(self, now: float, stats, roles, threads, host: int) -> dict:
        seconds = now - self._last_time
        percent = lambda ticks: round(100.0 * ticks / CLK_TCK / seconds, 1)  # noqa: E731
        by_role, by_process = dict.fromkeys(ROLES, 0.0), {}
        for pid, stat in stats.items():
            ticks = self._ticks(self._last.get(pid), stat)
            if ticks:
                by_role[roles[pid]] += percent(ticks)
                by_process[str(pid)] = percent(ticks)
        by_thread: dict[str, dict[str, float]] = {}
        for (pid, tid), stat in threads.items():
            self.thread_names.setdefault(pid, {})[tid] = stat.comm
            ticks = self._ticks(self._last_threads.get((pid, tid)), stat)
            if ticks:
                by_thread.setdefault(str(pid), {})[str(tid)] = percent(ticks)
        return {"t": round(now, 4), "seconds": round(seconds, 4), "host": percent(host - self._last_host),
                "roles": {role: round(value, 1) for role, value in by_role.items()}, "processes": by_process,
                "threads": by_thread}

    def _ticks(self, before: Stat | None, after: Stat) -> int:
        if before is not None and before.start == after.start:
            return after.ticks - before.ticks
        born_meanwhile = after.start / CLK_TCK >= self._last_uptime
        return after.ticks if born_meanwhile else 0  # a process seen first now: only its share of this interval

    def as_json(self) -> dict:
        return {"clk_tck": CLK_TCK, "cpu_count": os.cpu_count(), "unit": "percent of one core",
                "processes": {str(pid): info for pid, info in self.processes.items()},
                "thread_names": {str(pid): {str(tid): name for tid, name in names.items()}
                                 for pid, names in self.thread_names.items()},
                "samples": self.samples}


def summarize(data: dict, between: tuple[float, float] | None = None) -> dict:
    """Mean and max CPU per role (and of the busiest process in it), and the engine processes'
    threads, over the samples whose interval ended within `between` (all when None)."""
    samples = [s for s in data["samples"] if between is None or between[0] <= s["t"] <= between[1]]
    if not samples:
        return {"samples": 0}
    summary = {"samples": len(samples), "cpu_count": data["cpu_count"],
               "from": samples[0]["t"] - samples[0]["seconds"], "to": samples[-1]["t"],
               "host": _mean_max([s["host"] for s in samples]), "roles": {}, "threads": {}}
    for role in ROLES:
        pids = [pid for pid, info in data["processes"].items() if info["role"] == role]
        per_process = {pid: [s["processes"].get(pid, 0.0) for s in samples] for pid in pids}
        busiest = max(per_process, key=lambda pid: statistics.fmean(per_process[pid]), default=None)
        summary["roles"][role] = {**_mean_max([s["roles"][role] for s in samples]),
                                  "processes": sum(any(v) for v in per_process.values())}
        if busiest is not None:
            summary["roles"][role]["busiest"] = {"pid": busiest, **_mean_max(per_process[busiest])}
    for pid, names in data["thread_names"].items():
        if data["processes"][pid]["role"] not in ENGINE_ROLES:
            continue
        per_thread = {tid: [s["threads"].get(pid, {}).get(tid, 0.0) for s in samples] for tid in names}
        rows = [{"tid": tid, "name": names[tid], "main": tid == pid, **_mean_max(values)}
                for tid, values in per_thread.items() if any(values)]
        if rows:
            summary["threads"][pid] = sorted(rows, key=lambda row: -row["mean"])
    return summary


def format_summary(summary: dict, top_threads: int = 6) -> str:
    if not summary["samples"]:
        return "cpu usage: no samples"
    lines = [f"cpu usage, % of one core, {summary['samples']} samples over {summary['to'] - summary['from']:.1f} s: "
             f"host mean {summary['host']['mean']:.0f} max {summary['host']['max']:.0f} "
             f"(of {100 * summary['cpu_count']})"]
    for role, row in summary["roles"].items():
        if row["processes"]:
            busiest = row.get("busiest")
            lines.append(f"  {role:<13} mean {row['mean']:7.1f}  max {row['max']:7.1f}  ({row['processes']} processes"
                         + (f"; busiest mean {busiest['mean']:.1f} max {busiest['max']:.1f})" if busiest else ")"))
    for pid, rows in summary["threads"].items():
        shown = ", ".join(f"{r['tid']}{' main' if r['main'] else ''} {r['name']} {r['mean']:.1f}/{r['max']:.1f}"
                          for r in rows[:top_threads])
        lines.append(f"  threads of {pid} (mean/max): {shown}")
    return "\n".join(lines)


def _mean_max(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 1), "max": max(values)} if values else {"mean": 0.0, "max": 0.0}


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _thread_stats(pid: int) -> dict[int, Stat]:
    try:
        tids = [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return {}
    return {tid: stat for tid in tids if (stat := read_stat(f"/proc/{pid}/task/{tid}/stat"))}


def _uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def _host_busy_ticks() -> int:
    """All cores' busy ticks: everything in /proc/stat's first line but idle and iowait."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(values) - values[3] - values[4]


def repeat_until_stopped(action, interval: float, duration: float | None) -> None:
    """Call `action` every `interval` seconds until SIGTERM, SIGINT or `duration` seconds."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    deadline = None if duration is None else time.monotonic() + duration
    next_at = time.monotonic()
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        action()
        next_at += interval
        stop.wait(max(0.0, next_at - time.monotonic()))


def run(out: str, interval: float, duration: float | None) -> dict:
    """Sample until stopped, write `out`, and return the summary of the whole run."""
    sampler = Sampler()
    repeat_until_stopped(sampler.sample, interval, duration)
    sampler.sample()
    data = sampler.as_json()
    Path(out).write_text(json.dumps(data))
    return summarize(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.cpu_usage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", help="sample until SIGTERM or --duration, then write the samples here")
    action.add_argument("--summarize", metavar="FILE", help="print the summary of a written file")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--duration", type=float, help="seconds to sample (default: until SIGTERM)")
    parser.add_argument("--between", type=float, nargs=2, metavar=("T0", "T1"),
                        help="with --summarize: only this span (time.perf_counter() values)")
    args = parser.parse_args(argv)
    if args.summarize:
        summary = summarize(json.loads(Path(args.summarize).read_text()), args.between)
    else:
        summary = run(args.out, args.interval, args.duration)
    print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
