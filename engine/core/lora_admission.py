"""Which waiting LoRA requests may start: a step holds at most `max_loras` distinct adapters (the
device slots), so one whose adapter is not among the running requests' waits while they are all
taken (vLLM's rule); base-model requests are never held back.

vLLM's rule alone can starve an adapter: while requests for the running adapters keep coming, their
adapters never leave the running set. So once a request has waited for a slot STARVATION_STEPS
steps, its adapter is owed the next free slot: no other adapter's request starts until it has one
(requests of the base model still do), and the running ones finish and free a slot.
"""

from __future__ import annotations

from collections import Counter

from engine.request import Request

STARVATION_STEPS = 64


class LoRAAdmission:
    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.running_adapters: Counter[int] = Counter()  # lora_int_id -> running requests using it
        self.first_blocked: tuple[int, int] | None = None  # (step, lora_int_id) of the oldest wait for a slot
        self.owed: int | None = None  # the starving adapter that gets the next free slot

    def begin_pass(self, running: list[Request], waiting, step: int) -> None:
        """Called before each admission pass with the running requests and the waiting queue."""
        self.running_adapters = Counter(r.lora_int_id for r in running if r.lora_int_id)
        waiting_for = self.owed if self.owed is not None else self.first_blocked and self.first_blocked[1]
        if waiting_for and not any(r.lora_int_id == waiting_for for r in waiting):
            self.owed = self.first_blocked = None  # its requests left (aborted) or were admitted
        if self.owed is None and self.first_blocked and step - self.first_blocked[0] >= STARVATION_STEPS:
            self.owed = self.first_blocked[1]

    def allows(self, request: Request, step: int) -> bool:
        lora_id = request.lora_int_id
        if not lora_id:
            return True
        if lora_id in self.running_adapters:
            return self.owed is None or self.owed == lora_id
        if len(self.running_adapters) < self.max_loras and self.owed in (None, lora_id):
            return True
        if self.first_blocked is None:
            self.first_blocked = (step, lora_id)
        return False

    def admitted(self, request: Request) -> None:
        lora_id = request.lora_int_id
        if not lora_id:
            return
        self.running_adapters[lora_id] += 1
        if self.owed == lora_id:
            self.owed = None
        if self.first_blocked is not None and self.first_blocked[1] == lora_id:
            self.first_blocked = None
