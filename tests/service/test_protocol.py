"""The wire protocol on its own (no Redis): messages survive a round trip, and decoding rejects
anything that does not validate with a ProtocolError that says what is wrong."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import msgpack
import pytest

from engine.service.protocol import (
    PROTOCOL_VERSION, CompletionDelta, EngineRequest, Heartbeat, ModelCard, OutputDelta, ProtocolError, Usage,
    decode_delta, decode_deltas, decode_heartbeat, decode_model_card, decode_request, encode, encode_deltas,
    error_delta,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def valid_request(**changes) -> EngineRequest:
    fields = dict(request_id="req-1", model="m", tenant="acme", prompt="Hello there",
                  params={"temperature": 0.0, "max_tokens": 8, "stop": ["\n"], "seed": 3}, priority=2,
                  deadline=1_900_000_000.5, stream=True, reply_to="web-1")
    fields.update(changes)
    return EngineRequest(**fields)


def request_map(**changes) -> dict:
    """A valid encoded request as a plain map, with `changes` applied (None values delete keys)."""
    payload = msgpack.unpackb(encode(valid_request()), raw=False)
    for name, value in changes.items():
        if value is None:
            payload.pop(name, None)
        else:
            payload[name] = value
    return payload


def pack(payload) -> bytes:
    return msgpack.packb(payload, use_bin_type=True)


# -- round trips ----------------------------------------------------------------------------------


def test_request_round_trip():
    request = valid_request()
    decoded = decode_request(encode(request))
    assert decoded == request
    assert decoded.sampling_params().temperature == 0.0
    assert decoded.sampling_params().stop == ["\n"]


def test_request_with_token_ids_round_trip():
    request = valid_request(prompt=None, prompt_token_ids=[1, 2, 3, 49151], deadline=None, tenant="")
    assert decode_request(encode(request)) == request


def test_output_delta_round_trip():
    delta = OutputDelta(
        "req-1", 3,
        outputs=[CompletionDelta(0, " world", [1917], logprobs=[{1917: [-0.25, 1, " world"]}]),
                 CompletionDelta(1, "!", [17], finish_reason="stop", stop_reason="!")],
        finished=True, usage=Usage(prompt_tokens=5, completion_tokens=7, cached_tokens=4), replica_id="r1",
        timings={"queue_s": 0.5, "prefill_s": 0.25, "decode_s": 1.5})
    decoded = decode_delta(encode(delta))
    assert decoded == delta
    assert isinstance(decoded.usage, Usage)
    assert all(isinstance(o, CompletionDelta) for o in decoded.outputs)


def test_a_batch_of_deltas_round_trips_as_one_entry():
    deltas = [OutputDelta("req-1", 0, replica_id="r1"),
              OutputDelta("req-2", 5, [CompletionDelta(0, "é", [233, 1], logprobs=[{233: [-0.5, 2, "é"]}])],
                          usage=Usage(3, 6, 1), replica_id="r1", prompt_logprobs=[None, {7: [-1.0, 1, "a"]}]),
              error_delta("req-3", 2, "aborted", "the request was aborted", "r1"),
              OutputDelta("req-4", 9, finished=True, timings={"queue_s": 0.0, "prefill_s": 0.1, "decode_s": 2.0})]
    assert decode_deltas(encode_deltas(deltas)) == deltas
    assert decode_deltas(encode_deltas([])) == []


@pytest.mark.parametrize("payload", [{"deltas": "x"}, {"deltas": [1]}, {"deltas": [], "more": 1}, {}])
def test_malformed_delta_batches_are_rejected(payload):
    with pytest.raises(ProtocolError):
        decode_deltas(pack({**payload, "v": PROTOCOL_VERSION}))


def test_error_delta_round_trip():
    delta = error_delta("req-1", 4, "replica_lost", "gone", replica_id="r2")
    decoded = decode_delta(encode(delta))
    assert decoded == delta
    assert decoded.finished and decoded.error == {"code": "replica_lost", "message": "gone"}


def test_model_card_round_trip_with_the_models_sampling_defaults():
    card = ModelCard("m", 4096, "{}", None, {"eos_token": "</s>"}, {"temperature": 0.6, "top_k": 20})
    assert decode_model_card(encode(card)) == card
    payload = asdict(card) | {"v": PROTOCOL_VERSION, "sampling_defaults": [0.6]}
    with pytest.raises(ProtocolError, match="sampling_defaults"):
        decode_model_card(msgpack.packb(payload))


def test_heartbeat_round_trip():
    beat = Heartbeat("r1", "m", queue_depth=2, num_running=3, num_waiting=1, kv_cache_usage=0.25,
                     device_memory_bytes=123456789, tokens_per_s=41.5, max_model_len=2048, num_preemptions=4,
                     prefix_cache_queries=900, prefix_cache_hits=320, step_seconds=0.012)
    assert decode_heartbeat(encode(beat)) == beat


def test_messages_carry_the_protocol_version():
    assert msgpack.unpackb(encode(valid_request()), raw=False)["v"] == PROTOCOL_VERSION


# -- rejections -----------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", b"garbage that is not msgpack \xff\xfe",
                                  pack([1, 2, 3]), pack("a string")])
@pytest.mark.parametrize("decode", [decode_request, decode_delta, decode_heartbeat])
def test_garbage_is_rejected(decode, data):
    with pytest.raises(ProtocolError):
        decode(data)


@pytest.mark.parametrize("version", [None, 0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, str(PROTOCOL_VERSION)])
def test_wrong_or_missing_version_is_rejected(version):
    with pytest.raises(ProtocolError, match="version"):
        decode_request(pack(request_map(v=version) if version is not None else request_map(v=None)))


def test_unknown_field_is_rejected():
    with pytest.raises(ProtocolError, match="unknown field.*colour"):
        decode_request(pack(request_map(colour="blue")))


@pytest.mark.parametrize("name, value", [
    ("request_id", 17), ("model", ["m"]), ("prompt", 3.5), ("prompt_token_ids", "1 2 3"), ("params", [1]),
    ("priority", "high"), ("deadline", "tomorrow"), ("stream", "yes"), ("tenant", b"bytes"), ("reply_to", 7),
])
def test_wrong_type_is_rejected_naming_the_field(name, value):
    changes = {name: value}
    if name == "prompt_token_ids":
        changes["prompt"] = None
    with pytest.raises(ProtocolError, match=name):
        decode_request(pack(request_map(**changes)))


def test_non_integer_token_ids_are_rejected():
    with pytest.raises(ProtocolError, match="prompt_token_ids"):
        decode_request(pack(request_map(prompt=None, prompt_token_ids=[1, "2", 3])))
    with pytest.raises(ProtocolError, match="prompt_token_ids"):
        decode_request(pack(request_map(prompt=None, prompt_token_ids=[1, True])))


def test_missing_prompt_is_rejected():
    with pytest.raises(ProtocolError, match="exactly one of prompt and prompt_token_ids"):
        decode_request(pack(request_map(prompt=None)))


def test_prompt_and_token_ids_together_are_rejected():
    with pytest.raises(ProtocolError, match="exactly one of prompt and prompt_token_ids"):
        decode_request(pack(request_map(prompt_token_ids=[1, 2])))


@pytest.mark.parametrize("missing", ["request_id", "model", "reply_to"])
def test_missing_required_field_is_rejected(missing):
    with pytest.raises(ProtocolError, match=missing):
        decode_request(pack(request_map(**{missing: None})))


def test_empty_request_id_is_rejected():
    with pytest.raises(ProtocolError, match="request_id"):
        decode_request(pack(request_map(request_id="")))


@pytest.mark.parametrize("params, field", [
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"stop": [""]}, "stop"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"max_tokens": 4, "min_tokens": 9}, "min_tokens"),
    ({"best_of": 2}, "best_of"),  # not one of our SamplingParams fields
    ({"output_kind": 1}, "output_kind"),  # internal, never from the wire
    ({"all_stop_token_ids": [1]}, "all_stop_token_ids"),  # internal, never from the wire
])
def test_bad_sampling_params_are_rejected_naming_the_field(params, field):
    with pytest.raises(ProtocolError, match=field):
        decode_request(pack(request_map(params=params)))


@pytest.mark.parametrize("payload", [
    # Map keys that are not text: msgpack allows them, so a decoder must say no, not crash.
    {**msgpack.unpackb(encode(valid_request()), raw=False), 7: "x"},
    {**msgpack.unpackb(encode(valid_request()), raw=False), "params": {1: 2}},
])
def test_non_text_keys_are_a_protocol_error(payload):
    """A map with a non-string key must raise ProtocolError (not TypeError): the replica's reader
    catches only ProtocolError, and anything else ends its thread (see test_bad_input.py)."""
    with pytest.raises(ProtocolError):
        decode_request(pack(payload))


def test_delta_with_bad_fields_is_rejected():
    payload = msgpack.unpackb(encode(OutputDelta("r", 1)), raw=False)
    with pytest.raises(ProtocolError, match="seq"):
        decode_delta(pack({**payload, "seq": "one"}))
    with pytest.raises(ProtocolError, match="CompletionDelta"):
        decode_delta(pack({**payload, "outputs": [{"index": 0, "text": "x", "token_ids": [], "colour": 1}]}))


@pytest.mark.parametrize("changes", [{"outputs": [1]}, {"outputs": None}, {"usage": 5}, {"usage": [1, 2]}])
def test_delta_with_parts_that_are_not_maps_is_a_protocol_error(changes):
    payload = msgpack.unpackb(encode(OutputDelta("r", 1)), raw=False)
    with pytest.raises(ProtocolError):
        decode_delta(pack({**payload, **changes}))


def test_heartbeat_with_unknown_field_is_rejected():
    payload = msgpack.unpackb(encode(Heartbeat("r", "m")), raw=False)
    with pytest.raises(ProtocolError, match="unknown field"):
        decode_heartbeat(pack({**payload, "gpu": "H100"}))


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


def test_encode_uses_dataclass_fields_only():
    assert set(msgpack.unpackb(encode(valid_request()), raw=False)) == set(asdict(valid_request())) | {"v"}


# -- no torch on the client side ------------------------------------------------------------------


def test_client_side_modules_leave_torch_out():
    code = ("import sys\n"
            "import engine.service.protocol, engine.service.client, engine.service.transport\n"
            "from engine.service.client import EngineClient, EngineUnavailable\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                            timeout=60)
    assert result.stdout.split() == ["False", "False"], result.stdout + result.stderr
