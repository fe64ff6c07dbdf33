"""Redis Streams layout shared by engine replicas and clients (no torch here).

- `{prefix}:requests:{model}`: one stream per model; replicas read it through the consumer group
  `engines`, each only as much as it has room for, so load spreads by itself.
- `{prefix}:out:{request_id}`: one stream of OutputDeltas per request, expiring after OUTPUT_TTL_S.
- `{prefix}:aborts`: request ids to abort; every replica reads all of it.
- `{prefix}:hb:{model}:{replica}`: a replica's latest Heartbeat, expiring after HEARTBEAT_TTL_S.
- `{prefix}:model:{model}`: the model's ModelCard (tokenizer and chat template for the web side).
- `{prefix}:deadletter`: messages that did not validate, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "engines"
OUTPUT_TTL_S = 600
HEARTBEAT_TTL_S = 5
HEARTBEAT_INTERVAL_S = 1.0
STREAM_MAXLEN = 100_000
DEFAULT_PREFIX = "llm"


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    def requests(self, model: str) -> str:
        return f"{self.prefix}:requests:{model}"

    def output(self, request_id: str) -> str:
        return f"{self.prefix}:out:{request_id}"

    @property
    def aborts(self) -> str:
        return f"{self.prefix}:aborts"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}:deadletter"

    def model_card(self, model: str) -> str:
        return f"{self.prefix}:model:{model}"

    def heartbeat(self, model: str, replica_id: str) -> str:
        return f"{self.prefix}:hb:{model}:{replica_id}"

    def heartbeat_pattern(self, model: str | None = None) -> str:
        return f"{self.prefix}:hb:{model}:*" if model else f"{self.prefix}:hb:*"


class Backoff:
    """Exponential reconnect delays (0.1 s doubling to 2 s), reset after a success."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first, self.cap, self.next = first, cap, first

    def delay(self) -> float:
        current, self.next = self.next, min(self.next * 2, self.cap)
        return current

    def reset(self) -> None:
        self.next = self.first
