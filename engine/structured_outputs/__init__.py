"""Structured outputs: a per-request grammar (JSON Schema, regex, choice, Lark/GBNF) that constrains
sampling through a token bitmask. The grammar library is llguidance (see manager.py for why)."""

from engine.structured_outputs.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
