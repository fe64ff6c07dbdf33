"""The grammar library's host time per engine step, for a throughput run with constrained requests.

Wraps, for the duration of a `with` block, the two places where llguidance works on the step loop:
filling the token bitmask of a step's constrained rows (`StructuredOutputManager.bitmask`) and
advancing a matcher by a sampled token (`RequestGrammar.accept`); grammar compilation runs in a
thread pool off the loop and is not counted. Class-level wrapping catches the manager the engine
makes lazily for its first grammar.
"""

from __future__ import annotations

from contextlib import contextmanager

from engine.bench.timing import timed
from engine.structured_outputs.manager import RequestGrammar, StructuredOutputManager


@contextmanager
def grammar_cost(engine):
    """Yields a dict filled on exit: steps, mask and accept seconds, and their milliseconds per step."""
    totals = {"steps": 0, "grammar_mask_s": 0.0, "grammar_mask_calls": 0, "grammar_accept_s": 0.0,
              "grammar_accepts": 0}
    originals = (StructuredOutputManager.bitmask, RequestGrammar.accept, engine.step)

    def step():
        totals["steps"] += 1
        return originals[2]()

    StructuredOutputManager.bitmask = timed(totals, "grammar_mask_s", originals[0], count="grammar_mask_calls")
    RequestGrammar.accept = timed(totals, "grammar_accept_s", originals[1], count="grammar_accepts")
    engine.step = step
    try:
        yield totals
    finally:
        StructuredOutputManager.bitmask, RequestGrammar.accept = originals[0], originals[1]
        del engine.step  # the instance attribute hid the class's method
        steps = max(totals["steps"], 1)
        totals["grammar_mask_ms_per_step"] = totals["grammar_mask_s"] * 1e3 / steps
        totals["grammar_accept_ms_per_step"] = totals["grammar_accept_s"] * 1e3 / steps
