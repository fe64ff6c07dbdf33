"""An error delta carries what the request cost (issue 15, finding 7), in the same wire format as
every other delta: one that says nothing of usage decodes as zero usage."""

import msgpack

from engine.service.protocol import PROTOCOL_VERSION, Usage, decode_deltas, encode_deltas, error_delta


def test_an_error_delta_carries_its_usage_over_the_wire():
    delta = error_delta("req-1", 3, "aborted", "the request was aborted", "replica-a", usage=Usage(700, 2, 64))
    [decoded] = decode_deltas(encode_deltas([delta]))
    assert decoded.finished and decoded.error == {"code": "aborted", "message": "the request was aborted"}
    assert decoded.usage == Usage(700, 2, 64)


def test_an_error_delta_without_usage_reads_as_zero():
    assert error_delta("req-1", 0, "invalid_request", "bad").usage == Usage()
    legacy = {"v": PROTOCOL_VERSION, "deltas": [{"request_id": "req-1", "seq": 0, "finished": True,
                                                  "error": {"code": "aborted", "message": ""}}]}
    [decoded] = decode_deltas(msgpack.packb(legacy))
    assert decoded.usage == Usage()
