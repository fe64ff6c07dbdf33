"""The Hugging Face transformers baseline, run on the same requests in the same process.

Batched `generate` pads each batch to its longest prompt and runs it until its longest request
is done (or every row has hit EOS); only each request's own useful tokens are counted.
"""

from __future__ import annotations

import time

import torch

from engine.bench.workload import BenchRequest, useful_length
from engine.weights import ModelSource, load_model_config


def load_hf_model(source: ModelSource, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    if source.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name, dtype=dtype)
    elif source.kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype)
    else:  # dummy: same shapes, its own random weights (compare with ignore_eos)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(load_model_config(source), dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def run_hf_throughput(model, requests: list[BenchRequest], batch_size: int, eos_token_ids: set[int],
                      ignore_eos: bool, device: torch.device) -> dict:
    pad_id = min(eos_token_ids) if eos_token_ids else 0
    useful_tokens = 0
    started = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first:first + batch_size]
        longest = max(len(r.prompt_token_ids) for r in batch)
        input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, request in enumerate(batch):  # left padding, as decoder-only generation needs
            input_ids[row, longest - len(request.prompt_token_ids):] = torch.tensor(request.prompt_token_ids)
            attention_mask[row, longest - len(request.prompt_token_ids):] = 1
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=False,
            max_new_tokens=max(r.max_tokens for r in batch), min_new_tokens=None,
            eos_token_id=None if ignore_eos else sorted(eos_token_ids), pad_token_id=pad_id)
        new_tokens = generated[:, longest:].tolist()
        stop_ids = set() if ignore_eos else eos_token_ids
        useful_tokens += sum(useful_length(tokens, r.max_tokens, stop_ids) for tokens, r in zip(new_tokens, batch))
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {"elapsed_s": elapsed, "output_tokens": useful_tokens, "output_tokens_per_s": useful_tokens / elapsed,
            "requests_per_s": len(requests) / elapsed}
