"""Redis Streams layout shared by engine replicas and clients (no torch here).

- `{prefix}:requests:{model}`: one stream per model; replicas read it through the consumer group
  `engines`, each only as much as it has room for, so load spreads by itself. A replica deletes an
  entry once it has taken it (with the ack), so the stream holds only requests not yet taken; it
  expires REQUEST_STREAM_TTL_S (at least the newest request's deadline) after the last request.
- `{prefix}:reply:{client_id}`: one stream per client (a web process, a Celery worker), named in
  each request it sends; an entry carries every delta of one engine step for that client, so a web
  process reads all its streams' output with one XREAD, and an engine writes a step with one XADD
  per client. The client deletes entries once read; the stream is capped at REPLY_MAXLEN entries
  and expires after OUTPUT_TTL_S unused (a client that died leaves nothing behind for long).
- `{prefix}:client:{client_id}`: a client's liveness key, refreshed every CLIENT_REFRESH_S with a
  CLIENT_TTL_S expiry; replicas abort the requests of a client whose key is gone (its process died).
- `{prefix}:aborts`: request ids to abort; every replica reads all of it (capped, and it expires
  after ABORTS_TTL_S without an abort).
- `{prefix}:hb:{model}:{replica}`: a replica's latest Heartbeat, expiring after HEARTBEAT_TTL_S.
- `{prefix}:model:{model}`: the model's ModelCard (tokenizer and chat template for the web side).
- `{prefix}:loras:{model}`: the model's registered LoRA adapters, name -> JSON {"path", "int_id"}
  (engine/service/lora_control.py); `{prefix}:lora-ids:{model}` the counter their int ids come from.
- `{prefix}:deadletter`: messages that did not validate, with the reason (the last DEAD_LETTER_MAXLEN,
  each cut to DEAD_LETTER_BYTES).
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "engines"
OUTPUT_TTL_S = 300
REPLY_MAXLEN = 10_000  # entries (steps) a client may fall behind before its oldest are dropped
REQUEST_STREAM_TTL_S = 3600
ABORTS_MAXLEN = 10_000
ABORTS_TTL_S = 3600
DEAD_LETTER_MAXLEN = 1000
DEAD_LETTER_BYTES = 4096
CLIENT_TTL_S = 5
CLIENT_REFRESH_S = 1.0
HEARTBEAT_TTL_S = 5
HEARTBEAT_INTERVAL_S = 1.0
STREAM_MAXLEN = 100_000
DEFAULT_PREFIX = "llm"


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    def requests(self, model: str) -> str:
        return f"{self.prefix}:requests:{model}"

    def reply(self, client_id: str) -> str:
        return f"{self.prefix}:reply:{client_id}"

    def client(self, client_id: str) -> str:
        return f"{self.prefix}:client:{client_id}"

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

    def loras(self, model: str) -> str:
        return f"{self.prefix}:loras:{model}"

    def lora_ids(self, model: str) -> str:
        return f"{self.prefix}:lora-ids:{model}"

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
