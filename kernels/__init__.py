"""Triton kernels, one per module, each a drop-in for a plain-torch reference that is the CPU path."""

from __future__ import annotations

import importlib


def triton_or_reference(tensor, kernel: str, reference):
    """The function `kernel` of module `kernels.<kernel>` when `tensor` is on CUDA, else `reference`.

    The one place that picks between a Triton kernel and its torch reference. The kernel module is
    imported on first use, so CPU runs never import Triton.
    """
    if tensor.is_cuda:
        return getattr(importlib.import_module(f"kernels.{kernel}"), kernel)
    return reference
