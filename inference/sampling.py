"""From a validated OpenAI request to the engine's SamplingParams fields (vLLM's names)."""
from __future__ import annotations

from engine.sampling_params import SamplingParams
from inference.errors import invalid

_PASSED_THROUGH = ("n", "seed", "min_tokens", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output")
_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
             "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def sampling_fields(data: dict, *, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None, model_defaults: dict | None = None,
                    tenant_defaults: dict | None = None) -> dict:
    """SamplingParams keyword arguments, checked by SamplingParams itself (a 400 naming the field).
    A field the call leaves out takes the tenant's default, else the model's own (its
    generation_config.json, from the ModelCard), else OpenAI's."""
    defaults = _DEFAULTS | {k: v for k, v in (model_defaults or {}).items() if k in _DEFAULTS} \
        | {k: v for k, v in (tenant_defaults or {}).items() if k in _DEFAULTS}
    fields = {name: data[name] for name in _PASSED_THROUGH if data.get(name) is not None}
    fields |= {name: default if data.get(name) is None else data[name] for name, default in defaults.items()}
    fields |= {"stop": data.get("stop") or [], "stop_token_ids": data.get("stop_token_ids") or [],
               "max_tokens": max_tokens, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs}
    try:
        SamplingParams(**fields)
    except ValueError as error:
        raise invalid(str(error).split(" ", 1)[0], str(error)) from None
    return fields
