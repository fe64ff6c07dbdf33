"""`python -m engine.bench speculative`: speculation against plain decoding, in one process.

N-gram prompt lookup by default, on chat prompts that ask the model to repeat or lightly edit a
given text (prose and code): the work prompt lookup is for. With `--draft-model` (repeatable),
draft-model speculation with each draft instead (the same prompts; with dummy weights their text
does not matter). The same engine options run once plain and once per speculative config, first
one request at a time and then a batch; greedy, so the outputs must be identical (checked; on a GPU
in bfloat16 the verification's kernel may round differently from a decode's, so there the share of
equal tokens is reported too), and the figure is output tokens per second of each.
"""

from __future__ import annotations

import time

from engine.sampling_params import SamplingParams

TEXTS = [
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. All that glitters is not gold.",
    "def mean(values):\n    total = 0\n    for value in values:\n        total += value\n    return total / len(values)",
    "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of Spain.",
    "To install the package, run pip install engine, then start the server with engine serve --port 8000.",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Monday: gym. Tuesday: groceries. Wednesday: dentist at 3 pm. Thursday: call mom. Friday: movie night.",
    "Dear team, the release is delayed by one week because the tests found a bug in the payment service.",
    "SELECT name, email FROM users WHERE active = 1 AND created_at > '2024-01-01' ORDER BY name;",
]
TASKS = ["Repeat this text exactly:\n{}", "Copy this, word for word:\n{}",
         "Rewrite this text, changing nothing but the first word:\n{}", "Echo the following:\n{}"]


def copy_prompts(count: int) -> list[str]:
    return [f"<|im_start|>user\n{TASKS[i % len(TASKS)].format(TEXTS[i % len(TEXTS)])}<|im_end|>\n"
            f"<|im_start|>assistant\n" for i in range(count)]


def run_speculative_bench(options: dict, speculative_configs: dict[str, dict], batch_size: int, num_single: int,
                          max_tokens: int, release_memory, interleave: bool = False) -> dict:
    """`speculative_configs`: run name -> speculative_config, each measured against "plain";
    `release_memory()` runs after each engine is dropped (the next one sizes its KV cache from what is free).

    `interleave`: every engine is built first and they take turns, request by request (who goes first
    rotates) and batch by batch (twice, the second time in reverse order), so a machine whose load
    drifts during the run (a shared CPU) weighs on plain and speculative decoding alike. For the CPU:
    on a GPU each engine sizes its KV cache from the memory left by the others."""
    from engine.llm import LLM

    labels = ("batch_1", f"batch_{batch_size}")
    runs = {"plain": {}, **{name: {"speculative_config": config} for name, config in speculative_configs.items()}}
    timer = _Timer(SamplingParams(temperature=0.0, max_tokens=max_tokens))
    singles, batch = [[p] for p in copy_prompts(num_single)], copy_prompts(batch_size)
    results = {}

    def finish(name: str, llm) -> None:
        results[f"{name}_stats"] = {k: v for k, v in llm.llm_engine.stats().items() if k.startswith("spec_")}
        llm.llm_engine.shutdown()

    if interleave:
        engines = {name: _warm(LLM(**options, **extra), batch) for name, extra in runs.items()}
        names = list(engines)
        for index, prompt in enumerate(singles):
            for name in names[index % len(names):] + names[:index % len(names)]:
                timer.run(engines[name], name, labels[0], prompt)
        for order in (names, names[::-1]):
            for name in order:
                timer.run(engines[name], name, labels[1], batch, keep_outputs=order is names)
        for name, llm in engines.items():
            finish(name, llm)
        del engines, llm
        release_memory()
    else:
        for name, extra in runs.items():
            llm = _warm(LLM(**options, **extra), batch)
            for prompt in singles:
                timer.run(llm, name, labels[0], prompt)
            timer.run(llm, name, labels[1], batch)
            finish(name, llm)
            del llm
            release_memory()
    for (name, label), (tokens, elapsed) in timer.totals.items():
        results[f"{name}_{label}_tok_per_s"] = tokens / elapsed
    for name in speculative_configs:
        for label in labels:
            expected, got = timer.outputs[("plain", label)], timer.outputs[(name, label)]
            results[f"speedup_{name}_{label}"] = results[f"{name}_{label}_tok_per_s"] / results[f"plain_{label}_tok_per_s"]
            results[f"identical_{name}_{label}"] = expected == got
            results[f"equal_tokens_{name}_{label}"] = _share_of_equal_tokens(expected, got)
    return results


def _warm(llm, batch: list[str]):
    """One untimed pass of the batch, 16 tokens each: the step shapes of first use (oneDNN primitives of
    each row count on the CPU, kernel builds on a GPU) are then no longer paid inside a timed run."""
    llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    return llm


class _Timer:
    """Output tokens and seconds per (run, label), summed over its turns; the outputs of each run's turns."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.totals: dict[tuple[str, str], tuple[int, float]] = {}
        self.outputs: dict[tuple[str, str], list[list[int]]] = {}

    def run(self, llm, name: str, label: str, prompts: list[str], keep_outputs: bool = True) -> None:
        started = time.perf_counter()
        outputs = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, self.params, use_tqdm=False)]
        elapsed = time.perf_counter() - started
        tokens, seconds = self.totals.get((name, label), (0, 0.0))
        self.totals[(name, label)] = (tokens + sum(map(len, outputs)), seconds + elapsed)
        if keep_outputs:
            self.outputs.setdefault((name, label), []).extend(outputs)


def _share_of_equal_tokens(expected: list[list[int]], got: list[list[int]]) -> float:
    """Tokens equal to the expected ones up to each output's first difference, over all expected."""
    equal = 0
    for want, have in zip(expected, got):
        for a, b in zip(want, have):
            if a != b:
                break
            equal += 1
    return equal / max(1, sum(len(want) for want in expected))
