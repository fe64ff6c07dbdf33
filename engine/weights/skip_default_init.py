"""Build modules without torch's default parameter init, for weights that are written again at once.

nn.Linear's kaiming-uniform and nn.Embedding's normal init each touch every element, then a dummy
fill (or transformers' own `init_weights`) writes them all again: on a 47B-parameter model that is
wasted work, and on the CPU it is seconds per billion parameters. Inside this context their
`reset_parameters` does nothing, so the weights are only allocated (on the current device, in the
current default dtype) and left for the caller to fill. Subclasses with their own `reset_parameters`
keep it.
The switch is on the classes, so it holds for the whole process while the context is open: only a
model build (one thread, nothing else constructing layers meanwhile) belongs inside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_DEFAULT_INIT_CLASSES = (nn.Linear, nn.Embedding)


def _leave_uninitialized(module: nn.Module) -> None:
    pass


@contextmanager
def skip_default_init() -> Iterator[None]:
    originals = {cls: cls.__dict__["reset_parameters"] for cls in _DEFAULT_INIT_CLASSES}
    try:
        for cls in _DEFAULT_INIT_CLASSES:
            cls.reset_parameters = _leave_uninitialized
        yield
    finally:
        for cls, method in originals.items():
            cls.reset_parameters = method
