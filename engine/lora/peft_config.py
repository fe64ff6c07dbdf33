"""Reads and checks a PEFT LoRA adapter folder without torch (the web side validates a
registration with it): `adapter_config.json` and the safetensors header of
`adapter_model.safetensors` (names, shapes and dtypes; the tensors themselves are not read).

What the engine can serve: plain LoRA (optionally rsLoRA) on the attention projections (q/k/v/o,
or Phi-3's fused qkv) and the MLP projections (gate/up/down, or Phi-3's fused gate_up), one rank
and one alpha for all of them. Anything else is refused with a message naming the file and why.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                     "gate_up_proj")
# PEFT's key of one LoRA matrix: base_model.model.<module path>.lora_A.weight (or lora_B).
_TENSOR_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_LAYER_MODULE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<leaf>\w+)$")
# PEFT's LoRA on a parameter (`target_parameters`): transformers' stacked experts. With several on one
# module each wraps the one before, in the module's parameter order (gate_up_proj, then down_proj, in
# transformers' experts classes; not the config's list, which is a set's): the first sits deepest, one
# `.base_layer` under each later one.
_EXPERTS_MODULE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts(?P<nesting>(?:\.base_layer)*)$")
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
_MAX_HEADER_BYTES = 100 * 2**20


class LoRAAdapterError(ValueError):
    """An adapter the engine cannot serve; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors' name: F32, F16, BF16, ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LoRATensorName:
    """Where one LoRA matrix of the file goes: decoder layer, projection (PEFT's leaf name), A or B."""

    file_key: str
    layer: int
    module: str  # e.g. q_proj, gate_up_proj; experts.gate_up_proj for stacked experts
    kind: str  # lora_A or lora_B

    @property
    def on_experts(self) -> bool:
        return self.module.startswith("experts.")


@dataclass(frozen=True)
class PeftAdapterConfig:
    path: Path
    rank: int  # PEFT's r
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # supported leaf names the file has matrices for
    tensors: dict[str, TensorInfo]  # every tensor of the weights file, by its key
    names: tuple[LoRATensorName, ...]

    @property
    def scaling(self) -> float:
        """PEFT's: alpha / r, or alpha / sqrt(r) for rsLoRA; folded into B when loaded."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_peft_adapter(path: str | Path) -> PeftAdapterConfig:
    """Parse and check an adapter folder; raises LoRAAdapterError saying what is wrong."""
    folder = Path(path)
    if not folder.is_dir():
        raise LoRAAdapterError(f"LoRA adapter folder {str(folder)!r} does not exist")
    config = _read_config(folder / CONFIG_FILE)
    tensors = read_safetensors_header(folder / WEIGHTS_FILE)
    rank, alpha, use_rslora = _check_config(folder / CONFIG_FILE, config)
    expert_parameters = _expert_parameters(folder / CONFIG_FILE, config)
    names = tuple(_parse_name(folder / WEIGHTS_FILE, key, expert_parameters) for key in sorted(tensors))
    if not names:
        raise LoRAAdapterError(f"{folder / WEIGHTS_FILE}: holds no LoRA matrices")
    weights_file = folder / WEIGHTS_FILE
    for name in names:
        info = tensors[name.file_key]
        if len(info.shape) != 2:
            raise LoRAAdapterError(f"{weights_file}: {name.file_key} has shape {list(info.shape)}, expected a matrix")
        found_rank = info.shape[0] if name.kind == "lora_A" else info.shape[1]
        if found_rank != rank and not name.on_experts:  # experts: r per expert, checked against the model
            raise LoRAAdapterError(f"{weights_file}: {name.file_key} has rank {found_rank}, but r is {rank} in "
                                   f"{CONFIG_FILE}")
    pairs = {(n.layer, n.module, n.kind) for n in names}
    for layer, module, kind in pairs:
        other = "lora_B" if kind == "lora_A" else "lora_A"
        if (layer, module, other) not in pairs:
            raise LoRAAdapterError(f"{weights_file}: layer {layer} {module} has {kind} but no {other}")
    return PeftAdapterConfig(folder, rank, alpha, use_rslora, tuple(sorted({n.module for n in names})), tensors,
                             names)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensor table of a safetensors file: an 8-byte little-endian length, then that much JSON."""
    try:
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) != 8:
                raise LoRAAdapterError(f"{path}: not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES:
                raise LoRAAdapterError(f"{path}: not a safetensors file (header of {length} bytes)")
            header = json.loads(file.read(length))
    except FileNotFoundError:
        raise LoRAAdapterError(f"{path}: missing (a PEFT adapter saves its weights there)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoRAAdapterError(f"{path}: unreadable safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise LoRAAdapterError(f"{path}: the safetensors header is not a JSON object")
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            tensors[key] = TensorInfo(str(entry["dtype"]), tuple(int(n) for n in entry["shape"]))
        except (TypeError, KeyError, ValueError):
            raise LoRAAdapterError(f"{path}: malformed header entry for {key!r}") from None
    return tensors


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoRAAdapterError(f"{path}: missing (a PEFT adapter has an adapter_config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoRAAdapterError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise LoRAAdapterError(f"{path}: not a JSON object")
    return config


def _check_config(path: Path, config: dict) -> tuple[int, float, bool]:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoRAAdapterError(f"{path}: peft_type {peft_type!r} is not supported, only LORA")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoRAAdapterError(f"{path}: r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise LoRAAdapterError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")
    refusals = {
        "use_dora": "DoRA adapters are not supported",
        "modules_to_save": "modules_to_save (fully trained extra layers) is not supported",
        "rank_pattern": "per-module ranks (rank_pattern) are not supported",
        "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D layers) is not supported",
    }
    for key, why in refusals.items():
        if config.get(key):
            raise LoRAAdapterError(f"{path}: {why} ({key}={config[key]!r})")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise LoRAAdapterError(f"{path}: bias={bias!r} is not supported (LoRA biases), only 'none'")
    targets = config.get("target_modules")
    if isinstance(targets, list):  # a string is a regex: the weights file's keys are checked instead
        unsupported = sorted(str(t).rsplit(".", 1)[-1] for t in targets
                             if str(t).rsplit(".", 1)[-1] not in SUPPORTED_MODULES)
        if unsupported:
            raise LoRAAdapterError(f"{path}: target_modules {unsupported} are not supported; LoRA applies to "
                                   f"{', '.join(SUPPORTED_MODULES)}")
    return rank, float(alpha), bool(config.get("use_rslora", False))


def _expert_parameters(path: Path, config: dict) -> tuple[str, ...]:
    """The stacked expert parameters `target_parameters` names, in the experts module's order; anything
    else is refused."""
    targets = config.get("target_parameters") or []
    if not isinstance(targets, list):
        raise LoRAAdapterError(f"{path}: target_parameters must be a list, got {targets!r}")
    leaves = tuple(str(target).rsplit(".", 1)[-1] for target in targets)
    unsupported = [t for t, leaf in zip(targets, leaves) if leaf not in EXPERT_PARAMETERS
                   or not str(target_module_of(t)).endswith("experts")]
    if unsupported:
        raise LoRAAdapterError(f"{path}: target_parameters {unsupported} are not supported; LoRA on parameters "
                               f"applies to a mixture of experts' mlp.experts.{{{', '.join(EXPERT_PARAMETERS)}}}")
    return tuple(parameter for parameter in EXPERT_PARAMETERS if parameter in leaves)


def target_module_of(target: str) -> str:
    """`mlp.experts.gate_up_proj` -> `mlp.experts`; a bare parameter name is taken as the experts'."""
    return target.rsplit(".", 1)[0] if "." in target else "experts"


def _parse_name(path: Path, key: str, expert_parameters: tuple[str, ...] = ()) -> LoRATensorName:
    match = _TENSOR_NAME.match(key)
    experts_match = match and _EXPERTS_MODULE.match(match["module"])
    if experts_match:
        depth = experts_match["nesting"].count(".base_layer")
        if depth >= len(expert_parameters):
            raise LoRAAdapterError(f"{path}: tensor {key!r} is LoRA on the experts' parameters, but "
                                   f"{CONFIG_FILE}'s target_parameters names {len(expert_parameters)} of them")
        parameter = expert_parameters[len(expert_parameters) - 1 - depth]
        return LoRATensorName(key, int(experts_match["layer"]), f"experts.{parameter}", match["kind"])
    layer_match = match and _LAYER_MODULE.match(match["module"])
    if not layer_match:
        module = re.sub(r"^model\.layers\.\d+\.", "", match["module"]) if match else key
        raise LoRAAdapterError(f"{path}: tensor {key!r} is not supported (module {module!r}); LoRA applies to the "
                               f"decoder layers' {', '.join(SUPPORTED_MODULES)} (on a mixture of experts: its "
                               f"attention's, and its experts' through target_parameters)")
    if layer_match["leaf"] not in SUPPORTED_MODULES:
        raise LoRAAdapterError(f"{path}: tensor {key!r} targets {layer_match['leaf']!r}, which is not supported; "
                               f"LoRA applies to {', '.join(SUPPORTED_MODULES)}")
    return LoRATensorName(key, int(layer_match["layer"]), layer_match["leaf"], match["kind"])
