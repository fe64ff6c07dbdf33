"""Triton kernels run on the CPU through Triton's interpreter when there is no GPU.

The interpreter is chosen when a kernel is decorated, so this must run before kernel modules load.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
