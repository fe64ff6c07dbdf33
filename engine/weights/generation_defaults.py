"""A model's own sampling defaults, from the `generation_config.json` of its Hugging Face folder.

Model authors tune temperature, top_p and the like for their model; vLLM applies them to every
request that leaves the field unset (its `--generation-config auto`), and so do we: the offline
`LLM` when no SamplingParams are given, the web side for each field a call leaves out (the replica
publishes them in its ModelCard). GGUF files and dummy models have none.
"""

from __future__ import annotations

import json
import logging
import math

from engine.weights.source import ModelSource

logger = logging.getLogger(__name__)

# generation_config.json name -> SamplingParams name, and the values each may take.
_FIELDS = {
    "temperature": ("temperature", lambda v: v >= 0),
    "top_p": ("top_p", lambda v: 0 < v <= 1),
    "top_k": ("top_k", lambda v: float(v).is_integer() and v >= -1),
    "min_p": ("min_p", lambda v: 0 <= v <= 1),
    "repetition_penalty": ("repetition_penalty", lambda v: v > 0),
}


def load_sampling_defaults(source: ModelSource) -> dict:
    """SamplingParams fields by name; {} when the model has no generation_config.json. A value out
    of range is skipped with a warning rather than failing every request that would inherit it.
    `do_sample` is not read, as vLLM does not: a folder that sets a temperature means it."""
    path = source.path / "generation_config.json" if source.kind == "hf" and source.path else None
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        logger.warning("ignoring %s: %s", path, error)
        return {}
    if not isinstance(config, dict):
        return {}
    defaults = {}
    for name, (field, valid) in _FIELDS.items():
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not valid(value):
            logger.warning("ignoring %s=%r in %s", name, value, path)
            continue
        defaults[field] = int(value) if field == "top_k" else float(value)
    return defaults
