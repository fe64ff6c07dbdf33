"""Hostile input over every door of the live stack (issue 15, "what it must show"): a table of
hostile request bodies, each sent over REST, SSE, a websocket and as a batch line. Every one is
answered with a 4xx in OpenAI's shape (SSE: before the stream starts; websockets: an error frame;
batches: a per-line error), while another tenant streams on the same server and every one of its
streams finishes normally; afterwards the server still answers an ordinary call and logged no
traceback. Malformed-request basics (wrong types, ranges, content types) are in test_bad_input.py.
"""
from __future__ import annotations

import json
import re
import threading

import pytest
from websockets.exceptions import ConnectionClosed

from tests.service.conftest import wait_until

from .conftest import MODEL
from .test_batches import Worker, results, upload, wait_for
from .test_streaming_transports import ws_connect

pytestmark = pytest.mark.timeout(900)

CHAT, COMPLETIONS = "chat.completions", "completions"
PATHS = {CHAT: "/v1/chat/completions", COMPLETIONS: "/v1/completions"}
VOCAB = 49152  # the bundled SmolLM2's
MSG = [{"role": "user", "content": "Hi"}]
NEST = "@NEST@"  # stands for JSON nested too deep for json.dumps to write
DAPHNE_MAX_WS_MESSAGE = 1024 * 1024  # daphne's default cap on one websocket message (it closes the socket)


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": MSG, "max_tokens": 4, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 4, **fields}


def raw(body: dict, **literals: str) -> str:
    """`body` as JSON text, with each `"@NAME@"` string replaced by the literal given for NAME
    (numbers JSON allows but json.dumps cannot write: 1e400, NaN, nesting 100k deep)."""
    text = json.dumps(body)
    for name, literal in literals.items():
        text = text.replace(f'"@{name}@"', literal)
    return text


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (id, endpoint, JSON text of the body). json.dumps writes lone surrogates as "\ud800" escapes.
CASES = [
    ("top_k 2^64", CHAT, raw(chat(top_k=2**64))),
    ("top_k 2^63", CHAT, raw(chat(top_k=2**63))),
    ("top_k 2^40", CHAT, raw(chat(top_k=2**40))),
    ("top_k beyond the vocabulary", CHAT, raw(chat(top_k=VOCAB + 1))),
    ("top_k -2", CHAT, raw(chat(top_k=-2))),
    ("seed 2^64", CHAT, raw(chat(seed=2**64))),
    ("seed 2^63", CHAT, raw(chat(seed=2**63))),
    ("seed -2^63-1", CHAT, raw(chat(seed=-(2**63) - 1))),
    ("seed a float", CHAT, raw(chat(seed=1.5))),
    ("n 2^64", CHAT, raw(chat(n=2**64))),
    ("max_tokens 2^64", CHAT, raw(chat(max_tokens=2**64))),
    ("max_tokens 2^63-1", CHAT, raw(chat(max_tokens=2**63 - 1))),
    ("max_completion_tokens 2^70", CHAT, raw(chat(max_completion_tokens=2**70))),
    ("min_tokens 2^64", CHAT, raw(chat(min_tokens=2**64))),
    ("temperature 1e400", CHAT, raw(chat(temperature="@X@"), X="1e400")),
    ("temperature 10^30", CHAT, raw(chat(temperature=10**30))),
    ("top_p a 400-digit integer", CHAT, raw(chat(top_p="@X@"), X="1" + "0" * 400)),
    ("presence_penalty NaN", CHAT, raw(chat(presence_penalty="@X@"), X="NaN")),
    ("frequency_penalty -Infinity", CHAT, raw(chat(frequency_penalty="@X@"), X="-Infinity")),
    ("repetition_penalty 2^64", CHAT, raw(chat(repetition_penalty=2**64))),
    ("stop_token_ids [2^64]", CHAT, raw(chat(stop_token_ids=[2**64]))),
    ("stop_token_ids [2^31]", CHAT, raw(chat(stop_token_ids=[2**31]))),
    ("stop_token_ids beyond the vocabulary", CHAT, raw(chat(stop_token_ids=[1, VOCAB]))),
    ("stop_token_ids [-1]", CHAT, raw(chat(stop_token_ids=[-1]))),
    ("stop_token_ids 65 ids", CHAT, raw(chat(stop_token_ids=list(range(65))))),
    ("stop 5 strings", CHAT, raw(chat(stop=list("abcde")))),
    ("stop 16 strings", CHAT, raw(chat(stop=[f"s{i}" for i in range(16)]))),
    ("stop 1025 characters", CHAT, raw(chat(stop="x" * 1025))),
    ("stop 100k characters", CHAT, raw(chat(stop=["y" * 100_000]))),
    ("stop a lone high surrogate", CHAT, raw(chat(stop=["\ud800"]))),
    ("stop a lone low surrogate", CHAT, raw(chat(stop="a\udc00b"))),
    ("stop an empty string", CHAT, raw(chat(stop=[""]))),
    ("content a lone surrogate", CHAT, raw(chat(messages=[{"role": "user", "content": "hi \ud800"}]))),
    ("content part a lone surrogate", CHAT, raw(chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "\udfff"}]}]))),
    ("name a lone surrogate", CHAT, raw(chat(messages=[{"role": "user", "content": "x", "name": "\ud83d"}]))),
    ("role a lone surrogate", CHAT, raw(chat(messages=[{"role": "\ud800", "content": "x"}]))),
    ("model a lone surrogate", CHAT, raw(chat(model="\ud800"))),
    ("user a lone surrogate", CHAT, raw(chat(user="\ud800"))),
    ("an argument named by a lone surrogate", CHAT, raw({**chat(), "\ud800": 1})),
    ("an argument name of 100k characters", CHAT, raw({**chat(), "k" * 100_000: 1})),
    ("messages nested 100k deep", CHAT, raw(chat(messages=NEST), NEST=nested(100_000))),
    ("content nested 2000 deep", CHAT, raw(chat(messages=[{"role": "user", "content": NEST}]), NEST=nested(2000))),
    ("logit_bias nested 1100 deep", CHAT, raw(chat(logit_bias={"1": NEST}), NEST=nested(1100))),
    ("guided_json text nested 100k deep", CHAT, raw(chat(guided_json="[" * 100_000 + "]" * 100_000))),
    ("tool parameters nested 400 objects deep", CHAT, raw(chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": NEST}}]), NEST='{"type": "object", "properties": {"a": ' * 400 + "{}" + "}}" * 400)),
    ("a response_format schema of 70 KB", CHAT, raw(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "wide", "schema": {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(4000)}}}}))),
    ("1025 messages", CHAT, raw(chat(messages=MSG * 1025))),
    ("a 2.3 MB chat of 1024 messages", CHAT, raw(chat(messages=[{"role": "user", "content": "z" * 2300}] * 1024))),
    ("stream_options.include_usage 2^64", CHAT, raw(chat(stream_options={"include_usage": 2**64}))),
    ("prompt ids with 2^64", COMPLETIONS, raw(completion(prompt=[1, 2**64]))),
    ("prompt id 2^63", COMPLETIONS, raw(completion(prompt=[2**63]))),
    ("prompt id 2^40 with echo", COMPLETIONS, raw(completion(prompt=[1, 2**40], echo=True))),
    ("prompt id 2^31-1 with echo", COMPLETIONS, raw(completion(prompt=[1, 2**31 - 1], echo=True))),
    ("prompt id at the vocabulary size", COMPLETIONS, raw(completion(prompt=[[1], [VOCAB]], echo=True))),
    ("prompt id -1", COMPLETIONS, raw(completion(prompt=[-1]))),
    ("prompt a lone surrogate", COMPLETIONS, raw(completion(prompt="\ud800"))),
    ("prompts with a lone surrogate", COMPLETIONS, raw(completion(prompt=["ok", "x\udc00"]))),
    ("65 prompts", COMPLETIONS, raw(completion(prompt=["x"] * 65))),
    ("9000 prompt ids with echo", COMPLETIONS, raw(completion(prompt=[1] * 9000, echo=True, max_tokens=0,
                                                              logprobs=1))),
    ("a 1 MB text prompt", COMPLETIONS, raw(completion(prompt="w" * 1_000_000))),
    ("n=128 over 64 prompts", COMPLETIONS, raw(completion(prompt=["x"] * 64, n=128))),
    ("logprobs 2^64", COMPLETIONS, raw(completion(logprobs=2**64))),
    ("best_of 2^64", COMPLETIONS, raw(completion(best_of=2**64))),
    ("suffix a lone surrogate", COMPLETIONS, raw(completion(suffix="\ud800"))),
    ("prompt nested 100k deep", COMPLETIONS, raw(completion(prompt=NEST), NEST=nested(100_000))),
]
OVERSIZED = ("a 9 MB body", CHAT, raw(chat(messages=[{"role": "user", "content": "o" * 9_000_000}])))


def with_stream(text: str) -> str:
    return '{"stream": true, ' + text[1:]


def openai_error(body) -> dict | None:
    """The error object when `body` has exactly OpenAI's error shape, else None."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and set(error) == {"message", "type", "param", "code"} and error["message"]:
        return error
    return None


def check_http(http, name: str, endpoint: str, text: str, stream: bool, expected: range) -> str | None:
    """None when the answer is a 4xx JSON error in OpenAI's shape; what went wrong otherwise."""
    response = http.post(PATHS[endpoint], content=(with_stream(text) if stream else text).encode(),
                         headers={"Content-Type": "application/json"})
    kind = "SSE" if stream else "REST"
    if response.status_code not in expected:
        return f"{kind} {name}: HTTP {response.status_code} {response.text[:200]!r}"
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"{kind} {name}: content-type {response.headers.get('content-type')}"
    error = openai_error(response.json())
    if error is None or error["type"] == "server_error":
        return f"{kind} {name}: not a client error in OpenAI's shape: {response.text[:200]!r}"
    return None


class Sockets:
    """One authenticated websocket at a time; a new one after the server closed the last."""

    def __init__(self, live, key: str) -> None:
        self.live, self.key, self.socket = live, key, None

    def current(self):
        if self.socket is None:
            self.socket = ws_connect(self.live, self.key)
            assert json.loads(self.socket.recv(timeout=30)) == {"type": "authenticated"}
        return self.socket

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.socket = None


def check_websocket(sockets: Sockets, index: int, name: str, endpoint: str, text: str) -> str | None:
    call_id = f"h{index}"
    message = '{"type": "request", "id": "%s", "endpoint": "%s", "body": %s}' % (call_id, endpoint, text)
    socket = sockets.current()
    if len(message) > DAPHNE_MAX_WS_MESSAGE:  # daphne drops the socket before any consumer sees the frame
        try:  # the close can reach the client while it is still sending the frame, or after
            socket.send(message)
            frame = socket.recv(timeout=60)
        except ConnectionClosed:
            sockets.close()
            return None
        return f"WS {name}: a {len(message)}-byte frame was answered: {frame[:200]!r}"
    socket.send(message)
    frame = json.loads(socket.recv(timeout=60))
    error = openai_error(frame)
    if frame.get("type") != "error" or frame.get("id") not in (call_id, None) or error is None:
        return f"WS {name}: {json.dumps(frame)[:200]}"
    if error["type"] == "server_error":
        return f"WS {name}: {error}"
    return None


def check_batch(client, worker, endpoint: str, cases: list[tuple[int, str, str]]) -> list[str]:
    """One batch holding every hostile line of `endpoint`: each must end in the error file."""
    lines = ['{"custom_id": "h%d", "method": "POST", "url": "%s", "body": %s}' % (index, PATHS[endpoint], text)
             for index, _, text in cases]
    batch = client.batches.create(input_file_id=upload(client, lines), endpoint=PATHS[endpoint],
                                  completion_window="24h")
    done = wait_for(client, batch.id, lambda b: b.status in ("completed", "failed", "cancelled", "expired"),
                    timeout=600, worker=worker)
    if done.status != "completed":
        return [f"batch {endpoint}: {done.status} {done.errors}"]
    names = {f"h{index}": name for index, name, _ in cases}
    by_line = {f"Line {n + 1}": f"h{index}" for n, (index, _, _) in enumerate(cases)}
    answered, problems = set(), []
    for line in results(client, done.error_file_id):
        custom_id = line["custom_id"]
        if custom_id is None:  # not readable as JSON: named by its line number
            where = re.match(r"Line \d+", (line.get("error") or {}).get("message", ""))
            custom_id = by_line.get(where.group(0)) if where else None
        answered.add(custom_id)
        response = line["response"]
        if line["error"] is not None and line["error"].get("message"):
            continue
        if response is None or not 400 <= response["status_code"] < 500 or openai_error(response["body"]) is None:
            problems.append(f"batch {names.get(custom_id, custom_id)}: {json.dumps(line)[:200]}")
    problems += [f"batch {names[c]}: not in the error file" for c in sorted(set(names) - answered)]
    if done.output_file_id is not None:
        problems += [f"batch {names.get(line['custom_id'])}: succeeded" for line in results(client,
                                                                                       done.output_file_id)]
    return problems


class Bystander:
    """Another tenant streaming chat completions, one after another, until told to stop."""

    def __init__(self, live) -> None:
        self.client = live.openai(live.new_key())
        self.finished: list[str] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                text, reason = "", None
                for chunk in self.client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=24,
                        temperature=0, stream=True, extra_body={"ignore_eos": True}):
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                        reason = chunk.choices[0].finish_reason or reason
                if reason != "length" or not text:
                    self.failures.append(f"finish_reason {reason!r}, text {text!r}")
                self.finished.append(text)
            except Exception as error:  # noqa: BLE001 (every failure is the finding)
                self.failures.append(f"{type(error).__name__}: {error}")

    def __enter__(self) -> Bystander:
        self.thread.start()
        wait_until(lambda: self.finished or self.failures, 120, "the bystander's first stream")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(120)


def test_hostile_inputs_over_rest_sse_websockets_and_batches_are_4xx_while_another_tenant_streams(live, tmp_path):
    key = live.new_key()
    indexed = [(index, name, endpoint, text) for index, (name, endpoint, text) in enumerate(CASES)]
    log_start = live.server_log.stat().st_size
    worker = Worker(live, tmp_path).start()
    problems: list[str] = []
    try:
        with Bystander(live) as bystander, live.http() as http:
            http.headers["Authorization"] = f"Bearer {key}"
            streams_before = len(bystander.finished)
            for _, name, endpoint, text in indexed:
                for stream in (False, True):
                    problems.append(check_http(http, name, endpoint, text, stream, range(400, 500)))
            for stream in (False, True):
                problems.append(check_http(http, *OVERSIZED, stream, range(413, 414)))
            sockets = Sockets(live, key)
            try:
                for index, name, endpoint, text in indexed:
                    problems.append(check_websocket(sockets, index, name, endpoint, text))
            finally:
                sockets.close()
            client = live.openai(key)
            for endpoint in (CHAT, COMPLETIONS):
                problems += check_batch(client, worker, endpoint,
                                        [(i, n, t) for i, n, e, t in indexed if e == endpoint])
            wait_until(lambda: len(bystander.finished) > streams_before + 1, 120, "the bystander's next streams")
    finally:
        worker.kill()
        print("--- celery log ---\n" + worker.log_tail())
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)
    cases_sent = len(CASES) * 4 + 2  # REST, SSE, websocket and batch line each, plus the oversized body twice
    assert cases_sent >= 100 and len(CASES) >= 50
    assert not bystander.failures, bystander.failures
    # The server is up: an ordinary call works, and nothing above made it log a traceback.
    reply = live.openai(key).chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content
    logged = live.server_log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in logged, logged[-3000:]
