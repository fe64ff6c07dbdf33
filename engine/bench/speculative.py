"""`python -m engine.bench speculative`: n-gram speculation against plain decoding on copy-heavy work.

Chat prompts that ask the model to repeat or lightly edit a given text (prose and code): the work
prompt lookup is for. The same engine options run twice in this one process, without and with
`speculative_config`, first one request at a time and then a batch; greedy, so the outputs must be
identical (checked), and the figure is output tokens per second of each.
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


def run_speculative_bench(options: dict, speculative_config: dict, batch_size: int, num_single: int,
                          max_tokens: int) -> dict:
    from engine.llm import LLM

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    results, outputs = {}, {}
    for name, extra in (("plain", {}), ("ngram", {"speculative_config": speculative_config})):
        llm = LLM(**options, **extra)
        llm.generate(copy_prompts(1), SamplingParams(max_tokens=8), use_tqdm=False)  # warm up
        for label, prompts, batches in (("batch_1", copy_prompts(num_single), [[p] for p in copy_prompts(num_single)]),
                                        (f"batch_{batch_size}", copy_prompts(batch_size), [copy_prompts(batch_size)])):
            started, tokens, texts = time.perf_counter(), 0, []
            for batch in batches:
                for output in llm.generate(batch, params, use_tqdm=False):
                    tokens += len(output.outputs[0].token_ids)
                    texts.append(list(output.outputs[0].token_ids))
            elapsed = time.perf_counter() - started
            results[f"{name}_{label}_tok_per_s"] = tokens / elapsed
            outputs[(name, label)] = texts
        results[f"{name}_stats"] = {k: v for k, v in llm.llm_engine.stats().items() if k.startswith("spec_")}
        llm.llm_engine.shutdown()
        del llm
    for label in ("batch_1", f"batch_{batch_size}"):
        results[f"speedup_{label}"] = results[f"ngram_{label}_tok_per_s"] / results[f"plain_{label}_tok_per_s"]
        results[f"identical_{label}"] = outputs[("plain", label)] == outputs[("ngram", label)]
    return results
