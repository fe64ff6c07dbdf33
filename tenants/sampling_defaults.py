"""A tenant's own sampling defaults: the values its calls get for the fields they leave out, over
the model's (generation_config.json) and OpenAI's. Validated as the engine validates them, so a
default can never make every call of a tenant fail."""
from __future__ import annotations

from django.core.exceptions import ValidationError

from engine.sampling_params import SamplingParams

SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def validate_sampling_defaults(value) -> None:
    if not isinstance(value, dict):
        raise ValidationError("sampling defaults must be an object, e.g. {\"temperature\": 0.2}")
    unknown = sorted(set(value) - set(SAMPLING_DEFAULT_FIELDS))
    if unknown:
        raise ValidationError(f"unknown sampling default(s) {', '.join(map(str, unknown))}; allowed: "
                              f"{', '.join(SAMPLING_DEFAULT_FIELDS)}")
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValidationError(f"sampling default {name} must be a number, got {number!r}")
    if value.get("temperature", 0) > 2:  # the API's own range for a call's temperature (OpenAI's)
        raise ValidationError(f"sampling default temperature must be at most 2, got {value['temperature']!r}")
    try:
        SamplingParams(**value)
    except ValueError as error:
        raise ValidationError(f"sampling default {error}") from None
