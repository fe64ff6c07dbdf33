"""The wire protocol between the web side and engine replicas: compact msgpack, versioned,
validated on receipt. Imports no torch: Django and Celery import this module.

Messages are plain dataclasses; `encode()` / `decode_*()` turn them into bytes and back, and
`ProtocolError` says what is wrong with a message that does not validate.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from functools import cache

import msgpack

from engine.sampling_params import SamplingParams

# 2: requests name their client (reply_to); deltas travel in batches. 3: requests carry trace_context,
# final deltas their engine timings, heartbeats preemptions / prefix-cache counters / step time, model
# cards the model's sampling defaults (a version-2 reader would refuse these fields one by one).
# 4: sampling params may carry structured_outputs; heartbeats speculative-decoding counters.
# 5: requests may name a LoRA adapter (lora_name); heartbeats list the adapters held and those that failed,
#    and the largest rank they load (max_lora_rank).
# 6: model cards say whether the engine's streamed text is its tokenizer JSON's own decoding
#    (streams_backend_text), so the web side may detokenize plain streams itself.
PROTOCOL_VERSION = 6


class ProtocolError(ValueError):
    """A message that cannot be decoded or does not validate."""


@dataclass
class EngineRequest:
    request_id: str
    model: str
    tenant: str = ""
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    params: dict = field(default_factory=dict)  # SamplingParams fields by name
    priority: int = 0
    deadline: float | None = None  # unix time after which the request is dropped
    stream: bool = True
    submitted_at: float = field(default_factory=time.time)
    reply_to: str = ""  # the client id whose reply stream gets the deltas (transport.Keys.reply)
    trace_context: dict = field(default_factory=dict)  # W3C trace headers ({} untraced): engine/tracing.py
    lora_name: str | None = None  # a registered adapter of `model` (engine/service/lora_control.py), None: the base

    def sampling_params(self) -> SamplingParams:
        """Validated parameters; a bad field raises ProtocolError naming it."""
        unknown = sorted(map(str, set(self.params) - _SAMPLING_FIELDS))
        if unknown:
            raise ProtocolError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        try:
            return SamplingParams(**self.params)
        except (TypeError, ValueError) as error:
            raise ProtocolError(str(error)) from error


@dataclass
class CompletionDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None = None  # [{token_id: [logprob, rank, decoded]}] per token
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class OutputDelta:
    """One step's news for one request; the last one has `finished` (or `error`) set."""

    request_id: str
    seq: int
    outputs: list[CompletionDelta] = field(default_factory=list)
    finished: bool = False
    usage: Usage = field(default_factory=Usage)
    error: dict | None = None  # {"code": ..., "message": ...}
    replica_id: str = ""
    # Sent once, with the first tokens, when the request asked for prompt_logprobs:
    # [None, {token_id: [logprob, rank, decoded]}, ...], one entry per prompt token.
    prompt_logprobs: list[dict | None] | None = None
    # On the last delta of a request that finished: where its time went in the engine, in seconds
    # ({"queue_s", "prefill_s", "decode_s"}), for the web side's histograms (vLLM's metric names).
    timings: dict | None = None


@dataclass
class Heartbeat:
    replica_id: str
    model: str
    queue_depth: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    device_memory_bytes: int = 0
    tokens_per_s: float = 0.0  # generated tokens per second over the last minute
    num_aborted: int = 0  # requests aborted since the replica started
    max_model_len: int = 0
    num_preemptions: int = 0  # since the replica started
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of which served from it
    step_seconds: float = 0.0  # mean time of an engine step over the last minute
    # Speculative decoding since start: proposed tokens, accepted ones, and steps that speculated
    # (acceptance rate = accepted / proposed; mean tokens per speculating step = (accepted + steps) / steps).
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_steps: int = 0
    lora_adapters: list[str] = field(default_factory=list)  # LoRA adapters loaded and servable
    lora_errors: dict[str, str] = field(default_factory=dict)  # adapter name -> why it failed to load
    max_lora_rank: int = 0  # the largest adapter rank it loads (--max-lora-rank); 0: it runs without LoRA
    sent_at: float = field(default_factory=time.time)


@dataclass
class ModelCard:
    """What the web side needs to tokenize for a model the way its engines do (so it can count and
    cap prompt tokens and reserve quota before a request is queued). Published by each replica."""

    model: str
    max_model_len: int = 0
    tokenizer_json: str = ""  # a `tokenizers` JSON; empty when the engine runs without a tokenizer
    chat_template: str | None = None
    special_tokens: dict = field(default_factory=dict)  # bos_token, eos_token, ... for templates
    # The model's own sampling defaults (generation_config.json), SamplingParams fields by name: the
    # web side uses them for the fields a call leaves out.
    sampling_defaults: dict = field(default_factory=dict)
    # The engine streams the text that `tokenizer_json`'s own decoder gives (no clean-up on top): a web
    # process can then turn a stream's token ids into the same text (inference/stream_text.py).
    streams_backend_text: bool = False
    created_at: float = field(default_factory=time.time)


_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)} - {"all_stop_token_ids", "output_kind"}


def encode(message) -> bytes:
    payload = asdict(message)
    payload["v"] = PROTOCOL_VERSION
    return msgpack.packb(payload, use_bin_type=True)


def encode_deltas(deltas: list[OutputDelta]) -> bytes:
    """One reply-stream entry: a step's deltas for one client. Built by hand, not with asdict()
    (which deep-copies), because an engine step at batch 256 writes hundreds of these."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "deltas": [_delta_payload(d) for d in deltas]}, use_bin_type=True)


def _delta_payload(delta: OutputDelta) -> dict:
    usage = delta.usage
    return {"request_id": delta.request_id, "seq": delta.seq, "finished": delta.finished,
            "outputs": [{"index": o.index, "text": o.text, "token_ids": o.token_ids, "logprobs": o.logprobs,
                         "finish_reason": o.finish_reason, "stop_reason": o.stop_reason} for o in delta.outputs],
            "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                      "cached_tokens": usage.cached_tokens},
            "error": delta.error, "replica_id": delta.replica_id, "prompt_logprobs": delta.prompt_logprobs,
            "timings": delta.timings}


def _unpack(data: bytes) -> dict:
    try:
        payload = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as error:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"not a msgpack message: {error}") from error
    if not isinstance(payload, dict):
        raise ProtocolError("message is not a map")
    version = payload.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r}, expected {PROTOCOL_VERSION}")
    return payload


@cache
def _field_names(cls) -> frozenset[str]:
    """Asked for every delta a web process reads: fields() is slow enough to matter there."""
    return frozenset(f.name for f in fields(cls))


def _build(cls, payload: dict, types: dict):
    if not isinstance(payload, dict):
        raise ProtocolError(f"{cls.__name__} is not a map")
    unknown = sorted(map(str, payload.keys() - _field_names(cls)))
    if unknown:
        raise ProtocolError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
    for name, expected in types.items():
        if name in payload and payload[name] is not None and not isinstance(payload[name], expected):
            raise ProtocolError(f"{cls.__name__}.{name} has the wrong type ({type(payload[name]).__name__})")
    try:
        return cls(**payload)
    except TypeError as error:
        raise ProtocolError(f"{cls.__name__}: {error}") from error


def decode_request(data: bytes, *, check_params: bool = True) -> EngineRequest:
    request = _build(EngineRequest, _unpack(data), {
        "request_id": str, "model": str, "tenant": str, "prompt": str, "prompt_token_ids": list, "params": dict,
        "priority": int, "deadline": (int, float), "stream": bool, "submitted_at": (int, float), "reply_to": str,
        "trace_context": dict, "lora_name": str})
    if not request.request_id:
        raise ProtocolError("EngineRequest.request_id must not be empty")
    if not request.reply_to:
        raise ProtocolError("EngineRequest.reply_to must name the client that reads the output")
    if (request.prompt is None) == (request.prompt_token_ids is None):
        raise ProtocolError("EngineRequest needs exactly one of prompt and prompt_token_ids")
    if request.prompt_token_ids is not None and not all(
            isinstance(t, int) and not isinstance(t, bool) for t in request.prompt_token_ids):
        raise ProtocolError("EngineRequest.prompt_token_ids must be integers")
    if check_params:  # else the caller validates them (and can answer with invalid_request)
        request.sampling_params()
    return request


def decode_delta(data: bytes) -> OutputDelta:
    return _delta_from(_unpack(data))


def decode_deltas(data: bytes) -> list[OutputDelta]:
    """The deltas of one reply-stream entry (see encode_deltas)."""
    payload = _unpack(data)
    deltas = payload.get("deltas")
    if set(payload) != {"deltas"} or not isinstance(deltas, list):
        raise ProtocolError("a delta batch is a map with one list, `deltas`")
    return [_delta_from(d) for d in deltas]


def _delta_from(payload) -> OutputDelta:
    if not isinstance(payload, dict):
        raise ProtocolError("OutputDelta is not a map")
    outputs = payload.get("outputs", [])
    if not isinstance(outputs, list):
        raise ProtocolError("OutputDelta.outputs is not a list")
    payload["outputs"] = [_build(CompletionDelta, o, {}) for o in outputs]
    payload["usage"] = _build(Usage, payload.get("usage") or {}, {})
    return _build(OutputDelta, payload, {"request_id": str, "seq": int, "finished": bool, "timings": dict})


def decode_heartbeat(data: bytes) -> Heartbeat:
    return _build(Heartbeat, _unpack(data), {"replica_id": str, "model": str, "lora_adapters": list,
                                             "lora_errors": dict})


def decode_model_card(data: bytes) -> ModelCard:
    return _build(ModelCard, _unpack(data), {"model": str, "max_model_len": int, "tokenizer_json": str,
                                             "chat_template": str, "special_tokens": dict,
                                             "sampling_defaults": dict, "streams_backend_text": bool})


def error_delta(request_id: str, seq: int, code: str, message: str, replica_id: str = "", *,
                usage: Usage | None = None) -> OutputDelta:
    """The last delta of a request that did not finish normally; `usage` is the work it cost (every
    delta always carried a usage, so clients of this protocol version read it as they read any other)."""
    return OutputDelta(request_id, seq, finished=True, usage=usage or Usage(),
                       error={"code": code, "message": message}, replica_id=replica_id)
