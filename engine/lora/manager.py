"""LoRAModelManager: which adapters sit in the device slots, an LRU of adapters in host memory, and
the per-token slot mapping of each step (vLLM's LoRAModelManager / LRUCacheLoRAModelManager).

One lives in each model runner (every tensor-parallel rank has its own, fed the same steps, so all
make the same slot choices). The scheduler lets a step hold at most `max_loras` distinct adapters,
so `activate` always finds them a slot: those already in one stay, the others take free or least
recently used slots. A slot swap is queued on the device stream behind the step in flight, which
thus still reads the old adapter (async scheduling launches step N+1 before step N ends).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from engine.lora.adapter import load_adapter, model_lora_modules
from engine.lora.config import LoRAConfig
from engine.lora.layers import LoRAContext, LoRALinear, wrap_lora_layers
from engine.lora.moe_layer import LoRAFusedMoE, wrap_lora_experts
from engine.lora.request import LoRARequest
from engine.worker.input_buffers import CopyFence, StagedBuffer
from kernels.lora_mapping import NO_ADAPTER, LoRATokenMapping

SlotImages = dict[str, tuple[torch.Tensor, ...]]  # module name -> slot contents ((A, B), or an MoE layer's four)


class LoRAModelManager:
    def __init__(self, model: nn.Module, model_config, lora_config: LoRAConfig, max_num_tokens: int,
                 device: torch.device) -> None:
        self.model_config = model_config
        self.lora_config = lora_config
        self.device = device
        self.context = LoRAContext(LoRATokenMapping(max_num_tokens, lora_config.max_loras, device))
        # Pinned on CUDA: a copy from pageable memory would wait for the device, and async scheduling
        # would lose its overlap (a whole step's host time per token at batch 1).
        self._token_slots = StagedBuffer((max_num_tokens,), torch.int32, device)
        self._token_slots_copied = CopyFence(device)
        self.layers: dict[str, LoRALinear | LoRAFusedMoE] = wrap_lora_layers(
            model, model_lora_modules(model_config), self.context, lora_config.max_loras, lora_config.max_lora_rank)
        self.layers |= wrap_lora_experts(model, self.context, lora_config.max_loras, lora_config.max_lora_rank,
                                         max_num_tokens)
        self.slot_ids: list[int | None] = [None] * lora_config.max_loras  # the lora_int_id in each slot
        self._slot_last_used = [0] * lora_config.max_loras
        self._num_activations = 0
        self._host_cache: OrderedDict[int, SlotImages] = OrderedDict()  # LRU: most recently used last
        self._host_lock = threading.Lock()  # the service loads adapters from another thread

    # -- host cache -----------------------------------------------------------------------------------

    def add_adapter(self, lora_request: LoRARequest) -> bool:
        """Load an adapter into the host cache (the LRU one out if full); False if it was there.
        Raises LoRAAdapterError for one this model cannot take. Callable from any thread."""
        return self._cached_images(lora_request)[1]

    def _cached_images(self, lora_request: LoRARequest) -> tuple[SlotImages, bool]:
        """An adapter's slot images from the host cache, read from disk (and cached) if missing;
        whether they were read."""
        lora_id = lora_request.lora_int_id
        with self._host_lock:
            if lora_id in self._host_cache:
                self._host_cache.move_to_end(lora_id)
                return self._host_cache[lora_id], False
        images = self._slot_images(lora_request)  # outside the lock: reading files takes a while
        with self._host_lock:
            self._host_cache[lora_id] = images
            self._host_cache.move_to_end(lora_id)
            while len(self._host_cache) > self.lora_config.max_cpu_loras:
                self._host_cache.popitem(last=False)
        return images, True

    def remove_adapter(self, lora_int_id: int) -> bool:
        """Drop an adapter from the host cache and its slot (the caller makes sure no request uses it)."""
        with self._host_lock:
            removed = self._host_cache.pop(lora_int_id, None) is not None
        if lora_int_id in self.slot_ids:
            self.slot_ids[self.slot_ids.index(lora_int_id)] = None
            removed = True
        return removed

    def list_adapters(self) -> list[int]:
        with self._host_lock:
            return list(self._host_cache)

    def _slot_images(self, lora_request: LoRARequest) -> SlotImages:
        weights = load_adapter(lora_request.lora_path, lora_request.lora_name, self.model_config,
                               self.lora_config.max_lora_rank)
        return {name: layer.slot_image(weights.layers.get(name)) for name, layer in self.layers.items()}

    # -- one step -------------------------------------------------------------------------------------

    def activate(self, lora_requests: dict[int, LoRARequest]) -> dict[int, int]:
        """Put the step's adapters (at most max_loras) in slots; returns lora_int_id -> slot."""
        self._num_activations += 1
        if len(lora_requests) > len(self.slot_ids):
            raise RuntimeError(f"a step uses {len(lora_requests)} adapters, more than max_loras={len(self.slot_ids)}")
        slot_of = {lora_id: slot for slot, lora_id in enumerate(self.slot_ids) if lora_id in lora_requests}
        for lora_id, lora_request in lora_requests.items():
            if lora_id not in slot_of:
                slot = self._free_slot(set(slot_of.values()))
                self._load_slot(slot, lora_request)
                slot_of[lora_id] = slot
        for slot in slot_of.values():
            self._slot_last_used[slot] = self._num_activations
        return slot_of

    def _free_slot(self, taken: set[int]) -> int:
        """An empty slot, else the least recently used one this step does not need."""
        candidates = [slot for slot in range(len(self.slot_ids)) if slot not in taken]
        empty = [slot for slot in candidates if self.slot_ids[slot] is None]
        return empty[0] if empty else min(candidates, key=self._slot_last_used.__getitem__)

    def _load_slot(self, slot: int, lora_request: LoRARequest) -> None:
        images, _ = self._cached_images(lora_request)  # from disk again if the host cache let it go
        for name, layer in self.layers.items():
            layer.set_slot(slot, images[name])
        self.slot_ids[slot] = lora_request.lora_int_id

    def prepare_step(self, rows: list[tuple[LoRARequest | None, int]], num_padded_tokens: int) -> None:
        """Slots for a step's adapters and its token mapping; `rows` are its requests' (adapter, tokens)
        in batch order, padded with tokens without an adapter up to `num_padded_tokens`."""
        slot_of = self.activate({lora.lora_int_id: lora for lora, _ in rows if lora is not None})
        token_slots = np.full(num_padded_tokens, NO_ADAPTER, dtype=np.int32)
        start = 0
        for lora, num_tokens in rows:
            if lora is not None:
                token_slots[start:start + num_tokens] = slot_of[lora.lora_int_id]
            start += num_tokens
        self.set_token_slots(token_slots)

    def set_token_slots(self, token_slots: np.ndarray) -> None:
        """The step's slot per token (-1: no adapter), padded rows included; sorted on the device."""
        self.context.active = bool((token_slots != NO_ADAPTER).any())
        self._token_slots_copied.wait()  # the last step's copy may still read the pinned buffer
        self._token_slots.np[:len(token_slots)] = token_slots
        self.context.mapping.fill(self._token_slots.copy(len(token_slots)))
        self._token_slots_copied.mark()

    def prepare_capture(self, num_tokens: int) -> None:
        """Before a decode CUDA graph of `num_tokens` is captured: the LoRA kernels go into it (every
        replay runs them over the mapping its step filled; tokens without an adapter exit at once)."""
        self.set_token_slots(np.full(num_tokens, NO_ADAPTER, dtype=np.int32))
        self.context.active = True
