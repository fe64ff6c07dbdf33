"""`python -m engine.bench serve`: its SSE bookkeeping and report without a server, and a whole
`--launch` run (Redis, engine, two web workers) whose 256 streams must all complete in full."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from engine.bench.serve import RequestRecord, SseLines, arrival_times, format_report, percentile, summarize
from tests.service.conftest import REPO_ROOT


def _chunk(text: str, finish: str | None = None) -> bytes:
    return json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": None}).encode()


def _usage(completion_tokens: int) -> bytes:
    return json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": completion_tokens}}).encode()


def _streamed(payloads: list[bytes], max_tokens: int = 2) -> RequestRecord:
    record = RequestRecord(index=0, prompt_tokens=3, max_tokens=max_tokens, started=10.0, status=200)
    for i, payload in enumerate(payloads):
        record.on_data(payload, 10.5 + i)
    record.ended = 10.5 + len(payloads)
    return record


def test_sse_lines_are_split_across_reads_and_only_data_lines_count():
    lines = SseLines()
    assert lines.feed(b'data: {"a": 1}\n\nda') == [b'{"a": 1}']
    assert lines.feed(b"ta: [DONE]\r\n\n: a comment\nevent: x\n") == [b"[DONE]"]
    assert lines.feed(b"data: partial") == []


def test_a_full_stream_is_completed_and_timed_per_chunk():
    record = _streamed([_chunk("a"), _chunk("", "length"), _usage(2), b"[DONE]"])
    assert record.outcome == "completed"
    assert record.completion_tokens == 2
    assert record.chunk_times == [10.5, 11.5]  # the empty text still carried a token; the usage chunk none
    assert record.ttft() == 0.5 and record.itl() == [1.0] and record.tpot() == 1.0


def test_an_error_event_fails_and_a_missing_done_is_a_cut():
    assert _streamed([_chunk("a"), b'{"error": {"code": "engine_dead"}}', b"[DONE]"]).outcome == "failed"
    assert _streamed([_chunk("a"), _chunk("b", "length"), _usage(2)]).outcome == "cut"
    assert _streamed([_chunk("a"), b"[DONE]"]).outcome == "cut"  # [DONE] before any finish_reason
    unanswered = RequestRecord(index=1, prompt_tokens=3, max_tokens=2, cut="ConnectError: refused")
    assert unanswered.outcome == "cut"
    refused = RequestRecord(index=2, prompt_tokens=3, max_tokens=2, status=429, error='{"error": {}}')
    assert refused.outcome == "failed"


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0


def test_summary_counts_outcomes_and_tokens_and_reports_them():
    full = _streamed([_chunk("a"), _chunk("b", "length"), _usage(2), b"[DONE]"])
    short = _streamed([_chunk("a", "length"), _usage(1), b"[DONE]"], max_tokens=2)
    cut = _streamed([_chunk("a")])
    cut.cut = "the stream ended before [DONE]"
    summary = summarize([full, short, cut], duration_s=2.0)
    assert (summary["completed"], summary["failed"], summary["cut"]) == (2, 0, 1)
    assert summary["expected_tokens_ok"] == 1
    assert summary["total_output_tokens"] == 3 and summary["output_throughput"] == 1.5
    assert summary["mean_ttft_ms"] == 500.0 and summary["p50_tpot_ms"] == 1000.0
    report = format_report(summary)
    assert "Successful requests:" in report and "request 0: the stream ended before [DONE]" in report


def test_arrivals_are_all_at_once_or_poisson():
    assert arrival_times(3, math.inf, seed=0) == [0.0, 0.0, 0.0]
    times = arrival_times(2000, 100.0, seed=0)
    assert times == sorted(times) and times == arrival_times(2000, 100.0, seed=0)
    assert times[-1] / len(times) == pytest.approx(0.01, rel=0.1)


def _launch(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """`python -m engine.bench serve --launch` on the bundled model, on the CPU, with its logs in tmp_path."""
    command = [sys.executable, "-m", "engine.bench", "serve", "--launch", "--dtype", "float32",
               "--kv-cache-memory-bytes", "300000000", "--log-dir", str(tmp_path / "logs"), *flags]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=540)
    print(done.stdout[-5000:], done.stderr[-5000:])
    return done


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_launched_stack_completes_256_concurrent_streams_in_full(tmp_path):
    out = tmp_path / "out.json"
    done = _launch(tmp_path, "--web-workers", "2", "--num-clients", "2", "--num-prompts", "256", "--max-concurrency",
                   "256", "--input-len", "8", "--output-len", "4", "--max-num-seqs", "256", "--json", str(out))
    assert out.exists(), f"the bench exited with {done.returncode} before writing its results (output above)"
    http = json.loads(out.read_text())["http"]
    assert (http["completed"], http["failed"], http["cut"]) == (256, 0, 0), http["first_problems"]
    assert http["expected_tokens_ok"] == 256
    assert all(r["completion_tokens"] == r["max_tokens"] == 4 for r in http["requests"])
    assert done.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_child_that_dies_fails_the_launch_at_once_with_its_log(tmp_path):
    done = _launch(tmp_path, "--model", "dummy:no-such-preset", "--vocab-size", "1000", "--num-prompts", "1")
    assert done.returncode == 1
    assert "engine exited with 1" in done.stderr and "unknown dummy preset" in done.stderr
