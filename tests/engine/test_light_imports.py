"""`import engine` and its protocol-side modules stay free of torch; the offline API is lazy."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def modules_after(code: str) -> set[str]:
    """Run `code` in a fresh interpreter; return the names in its sys.modules."""
    script = f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=True)
    return set(result.stdout.split())


LIGHT_IMPORTS = [
    "import engine",
    "import engine; import engine.sampling_params; import engine.config; import engine.request; "
    "import engine.outputs; import engine.weights.source",
    "from engine import SamplingParams, RequestOutputKind, EngineConfig, RequestOutput, CompletionOutput",
    "from engine.sampling_params import SamplingParams; SamplingParams(temperature=0.5, stop='x')",
    "import engine.tokenization",  # web processes detokenize plain streams (inference/stream_text.py)
]


@pytest.mark.parametrize("code", LIGHT_IMPORTS)
def test_light_imports_leave_torch_out(code):
    modules = modules_after(code)
    assert "engine" in modules
    assert "torch" not in modules
    assert "transformers" not in modules


def test_offline_api_is_loaded_only_when_asked_for():
    assert "engine.llm" not in modules_after("import engine")
    modules = modules_after("from engine import LLM, LLMEngine\n"
                            "import engine.llm, engine.llm_engine\n"
                            "assert LLM is engine.llm.LLM and LLMEngine is engine.llm_engine.LLMEngine")
    assert {"engine.llm", "engine.llm_engine"} <= modules


def test_unknown_attribute_raises_attribute_error():
    import engine

    with pytest.raises(AttributeError):
        engine.NoSuchThing  # noqa: B018
