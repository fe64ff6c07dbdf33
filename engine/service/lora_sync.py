"""A replica's LoRA adapters, kept in step with its model's registry in Redis (lora_control.py).

A thread of its own reads the registry about once a second, loads new adapters into the engine's
host cache (reading and checking the files off the step loop), and records why any failed; the
heartbeat advertises both. Requests name adapters (`EngineRequest.lora_name`); the main thread
looks them up in `servable`, which this thread replaces whole, never edits. An adapter that leaves
the registry (or is pointed at new files, under a new id) is no longer servable at once, and is
dropped from memory by the main thread once no unfinished request uses it.
"""

from __future__ import annotations

import logging
import threading

import redis

from engine.lora.request import LoRARequest
from engine.service.lora_control import registered_adapters
from engine.service.transport import HEARTBEAT_INTERVAL_S, Backoff

logger = logging.getLogger(__name__)


class ReplicaAdapters:
    def __init__(self, engine, model_name: str, key_prefix: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.key_prefix = key_prefix
        self.servable: dict[str, LoRARequest] = {}  # loaded, by adapter name
        self.errors: dict[str, str] = {}  # adapter name -> why it could not be loaded
        self._failed: dict[str, LoRARequest] = {}  # not retried until the registry changes it
        self._retired: list[LoRARequest] = []  # to drop from memory once unused (main thread)
        self._retired_lock = threading.Lock()

    def run(self, redis_url: str, stopped: threading.Event) -> None:
        """The sync thread: refresh every HEARTBEAT_INTERVAL_S until `stopped`."""
        client, backoff = redis.Redis.from_url(redis_url), Backoff()
        while not stopped.is_set():
            try:
                self.refresh(client)
                backoff.reset()
                stopped.wait(HEARTBEAT_INTERVAL_S)
            except redis.ConnectionError as error:
                delay = backoff.delay()
                logger.warning("lora sync: Redis unreachable (%s); retrying in %.1fs", error, delay)
                stopped.wait(delay)
            except Exception:  # never let the thread die: the heartbeat would advertise stale adapters
                logger.exception("lora sync: unexpected error")
                stopped.wait(backoff.delay())

    def refresh(self, client) -> None:
        registered = {name: LoRARequest(name, int_id, path) for name, (path, int_id) in
                      registered_adapters(client, self.model_name, key_prefix=self.key_prefix).items()}
        servable, errors = {}, {}
        for name, lora_request in registered.items():
            if self.servable.get(name) == lora_request:
                servable[name] = lora_request
            elif self._failed.get(name) == lora_request:
                errors[name] = self.errors[name]
            else:
                try:
                    self.engine.add_lora(lora_request)
                except (ValueError, OSError) as error:
                    logger.warning("LoRA adapter %r (%s) cannot be served: %s", name, lora_request.lora_path, error)
                    errors[name] = str(error)
                    self._failed[name] = lora_request
                    continue
                logger.info("LoRA adapter %r loaded from %s (id %d)", name, lora_request.lora_path,
                            lora_request.lora_int_id)
                servable[name] = lora_request
        gone = [r for name, r in self.servable.items() if servable.get(name) != r]
        self._failed = {name: r for name, r in self._failed.items() if registered.get(name) == r}
        self.servable, self.errors = servable, errors
        if gone:
            with self._retired_lock:
                self._retired += gone

    def drop_retired(self) -> None:
        """Main thread: forget retired adapters that no unfinished request uses any more."""
        if not self._retired:
            return
        with self._retired_lock:
            retired, self._retired = self._retired, []
        in_use = {r.lora_int_id for r in self.engine.scheduler.requests.values()}
        for lora_request in retired:
            if lora_request.lora_int_id in in_use:
                with self._retired_lock:
                    self._retired.append(lora_request)
            else:
                self.engine.remove_lora(lora_request.lora_int_id)
                logger.info("LoRA adapter %r (id %d) dropped", lora_request.lora_name, lora_request.lora_int_id)
