"""Which layers share a block table: the KV cache groups (vLLM v1's hybrid allocator).

Layers that attend alike share one group. When they do not (Gemma 2/3: global layers and
sliding-window ones), every group gets the same number of layers, so a block id means the same
bytes in every group: layer j of each group lives in the cache tensor's slot j (the runner's
allocate_kv_cache), and the pool hands each block to one group at a time. The group size is the
smallest count of any kind of layer; a kind whose count it does not divide gets a last, shorter
group (its missing layers' slots go unused). Full-attention groups come first: group 0 then sees
every token, and a draft model reads group 0's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVCacheGroup:
    sliding_window: int | None  # None: full attention
    layer_indices: tuple[int, ...]  # indices into the model's attention layers, in order


def group_layers(sliding_windows: list[int | None]) -> list[KVCacheGroup]:
    """The groups of layers whose windows are `sliding_windows` (one per attention layer)."""
    kinds: dict[int | None, list[int]] = {}
    for index, window in enumerate(sliding_windows):
        kinds.setdefault(window, []).append(index)
    if len(kinds) <= 1:
        return [KVCacheGroup(next(iter(kinds), None), tuple(range(len(sliding_windows))))]
    size = min(map(len, kinds.values()))
    order = sorted(kinds, key=lambda window: (window is not None, window or 0))
    return [KVCacheGroup(window, tuple(kinds[window][start:start + size]))
            for window in order for start in range(0, len(kinds[window]), size)]


def group_size(groups: list[KVCacheGroup]) -> int:
    """Layers per group: the cache tensor's slots per block."""
    return max(len(group.layer_indices) for group in groups)


def describe_kv_cache_groups(groups: list[KVCacheGroup]) -> str:
    """For the start-up log: '' for one group, else e.g. ' in 6 groups of 8 layers (1 global, 5 sliding 1024)'."""
    if len(groups) == 1:
        return ""
    kinds: dict[int | None, int] = {}
    for group in groups:
        kinds[group.sliding_window] = kinds.get(group.sliding_window, 0) + 1
    parts = [f"{count} global" if window is None else f"{count} sliding {window}" for window, count in kinds.items()]
    size = group_size(groups)
    return f" in {len(groups)} groups of {size} layer{'s' if size > 1 else ''} ({', '.join(parts)})"
