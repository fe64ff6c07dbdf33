"""Reading a batch input file: one request per non-blank JSONL line, each checked on its own.

A bad line becomes an error for that line alone (OpenAI's error-file line), never a failed job:
the other lines of the file still run.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from inference import json_parsing
from inference.endpoints import BY_PATH

BATCH_ENDPOINTS = tuple(BY_PATH)  # a batch job runs lines of one of these


@dataclass
class InputLine:
    index: int
    custom_id: str | None
    body: dict | None  # None when the line is invalid
    error: dict | None = None  # {"code", "message"} when the line is invalid


def parse_input(*, content: bytes, endpoint: str) -> list[InputLine]:
    """Every non-blank line of `content`, checked for shape, endpoint and a unique custom_id."""
    lines, seen = [], set()
    for index, raw in enumerate(line for line in content.splitlines() if line.strip()):
        line = _parse_line(index, raw, endpoint)
        if line.error is None and line.custom_id in seen:
            line = InputLine(index, line.custom_id, None, _error(f"Line {index + 1}: custom_id {line.custom_id!r} "
                                                                 "is used by an earlier line; it must be unique."))
        seen.add(line.custom_id)
        lines.append(line)
    return lines


def _parse_line(index: int, raw: bytes, endpoint: str) -> InputLine:
    where = f"Line {index + 1}"
    try:
        request = json_parsing.loads(raw)  # orjson: a line nested 100k deep is an invalid line, not a crash
    except json_parsing.InvalidJson:
        return InputLine(index, None, None, _error(f"{where} is not valid JSON."))
    if not isinstance(request, dict):
        return InputLine(index, None, None, _error(f"{where} must be a JSON object."))
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        return InputLine(index, None, None, _error(f"{where}: custom_id must be a non-empty string (512 characters "
                                                   "at most)."))
    problem = None
    if set(request) - {"custom_id", "method", "url", "body"}:
        problem = f"unknown field(s) {', '.join(sorted(set(request) - {'custom_id', 'method', 'url', 'body'}))}"
    elif request.get("method") != "POST":
        problem = "method must be POST"
    elif request.get("url") != endpoint:
        problem = f"url must be the batch's endpoint {endpoint}"
    elif not isinstance(request.get("body"), dict):
        problem = "body must be a JSON object"
    if problem:
        return InputLine(index, custom_id, None, _error(f"{where}: {problem}."))
    return InputLine(index, custom_id, request["body"])


def _error(message: str) -> dict:
    return {"code": "invalid_request", "message": message}


def output_line(*, custom_id: str | None, response: dict | None = None, error: dict | None = None) -> dict:
    """One line of an output or error file, in OpenAI's format."""
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id, "response": response, "error": error}
