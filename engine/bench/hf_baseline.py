"""The Hugging Face transformers baseline, run on the same requests in the same process.

Batched `generate` pads each batch to its longest prompt and runs it until its longest request
is done (or every row has hit EOS); only each request's own useful tokens are counted.
"""

from __future__ import annotations

import time

import torch

from engine.bench.workload import BenchRequest, useful_length
from engine.weights import ModelSource, load_model_config
from engine.weights.skip_default_init import skip_default_init


def load_hf_model(source: ModelSource, dtype: torch.dtype, device: torch.device, seed: int = 0):
    from transformers import AutoModelForCausalLM

    if source.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name, dtype=dtype)
    elif source.kind == "hf":
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype)
    else:
        model = build_dummy_hf_model(load_model_config(source), dtype, device, seed)
    return model.to(device).eval()


def build_dummy_hf_model(config, dtype: torch.dtype, device: torch.device, seed: int):
    """Same shapes as our dummy model, its own random weights (compare with ignore_eos): allocated on
    `device` in `dtype` from the start (no host copy), and written once, on that device, by
    transformers' own `init_weights` (normal with std initializer_range, 0.02: finite activations, as
    our uniform +-0.02; each model's norms and tied embeddings as transformers sets them), seeded.
    torch's default init of every Linear and Embedding, which that would overwrite, is skipped."""
    from transformers import AutoModelForCausalLM

    on_cuda = device.type == "cuda"
    cuda_devices = [torch.cuda.current_device() if device.index is None else device.index] if on_cuda else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        with torch.device(device), skip_default_init():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)


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
