"""Linear layers whose weights are packed once for oneDNN: the CPU's float32 path.

On the CPU, F.linear calls MKL's sgemm, which packs the weight afresh on every call of more than one
row. Reading the weights bounds these small steps, so a 5-token step (a speculative verification:
the last token and 4 proposals) cost about twice a one-token decode in the linear layers (all 121
projections of SmolLM2-135M on one core: 106 ms against 53 ms). With each weight packed at load into
oneDNN's blocked layout, 5 rows cost about 1.2x one (67 against 57 ms), and longer steps (prefill)
no more than MKL's. Results differ from MKL's only by float32 rounding.

`prepack_linear_weights(model)` swaps every plain nn.Linear and the output projection after the
weights are loaded, a transform in the style of gpt-fast's quantization: the model files stay as
they are. LoRA wraps plain nn.Linear layers, so a model that takes adapters is not packed.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.linear import Linear


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PrepackedLinear(nn.Module):
    """nn.Linear's forward from a oneDNN-packed copy of its weight (the plain one is not kept)."""

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)  # for any number of rows
        self.register_buffer("packed_weight", packed, persistent=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linear_weights(model: nn.Module) -> None:
    """Swap in PrepackedLinear for every plain nn.Linear of a loaded LlamaForCausalLM-family model, and
    set its `packed_lm_head`. A tied output projection gets a packed copy of the embedding (vocab x
    hidden more memory): the embedding lookup still reads the plain rows."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (nn.Linear, Linear):
                setattr(module, name, PrepackedLinear(child.weight, child.bias))
    if model.lm_head is None:
        model.packed_lm_head = PrepackedLinear(model.model.embed_tokens.weight, None)
    else:
        model.packed_lm_head = model.lm_head


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights: its parameters and the packed copies, which are not among them."""
    tensors = [*model.parameters(), *(m.packed_weight for m in model.modules() if isinstance(m, PrepackedLinear))]
    return sum(t.numel() * t.element_size() for t in tensors)
