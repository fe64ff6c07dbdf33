"""Logits -> next tokens for a batch of requests that each carry their own SamplingParams.

Order, as in vLLM: raw logprobs (if asked) -> grammar bitmask -> penalties -> min_tokens mask ->
greedy or temperature -> top-k / top-p / min-p -> sample. Logprobs are the model's own (before the
grammar), so no -inf reaches a response. Sampling uses the exponential race
(argmax of p / q with q ~ Exp(1)), which draws exactly from p; a seeded request draws its q from
its own generator, so its output does not depend on what else is in the batch.

`sample()` never waits for the device (async scheduling queues the next step behind it): every
per-row parameter goes to the device without a sync, and the tokens stay there until `resolve()`.
Penalties are the exception (they read each request's history on the host); the engine plans
such steps without async scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request
from engine.structured_outputs.bitmask import apply_token_bitmask
from kernels import triton_or_reference


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row, when the request asked for logprobs: [(token_id, logprob, rank)], sampled token first.
    logprobs: list[list[tuple[int, float, int]] | None]


@dataclass
class DeviceSample:
    """Sampled tokens still on the device, with what their logprobs need."""

    token_ids: torch.Tensor  # [rows] int64
    raw_logprobs: torch.Tensor | None  # [rows, vocab] when any row asked for logprobs
    num_logprobs: list[int | None]

    def resolve(self, token_ids: list[int] | None = None) -> SamplerOutput:
        """To host lists (waits for the device unless `token_ids` were already read)."""
        token_list = self.token_ids.tolist() if token_ids is None else token_ids
        logprobs = [None] * len(token_list)
        for row, num in enumerate(self.num_logprobs):
            if num is not None:
                logprobs[row] = top_logprobs(self.raw_logprobs[row], token_list[row], num)
        return SamplerOutput(token_list, logprobs)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax: on CUDA kernels/argmax.py (a row cut into chunks, so batch 1 fills the GPU)."""
    return triton_or_reference(logits, "argmax", _torch_argmax)(logits)


def _torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting for the device's queued work (a pageable
    copy is staged at once; a blocking one would first wait for the stream)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self.request_generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, requests: list[Request], bitmask=None) -> SamplerOutput:
        return self.sample(logits, requests, bitmask).resolve()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, requests: list[Request], bitmask=None) -> DeviceSample:
        """`bitmask` (a GrammarBitmask) limits its rows to the tokens their grammars allow."""
        params = [r.sampling_params for r in requests]
        num_logprobs = [p.logprobs for p in params]
        wants_logprobs = any(num is not None for num in num_logprobs)
        if not wants_logprobs and all(_plain_greedy(r) for r in requests):
            # Nothing to adjust: the argmax of the model's own dtype is the argmax of its float32 copy,
            # without writing (and reading) a float32 copy of batch x vocabulary logits.
            self._apply_bitmask(logits, bitmask)
            return DeviceSample(greedy_tokens(logits), None, num_logprobs)
        logits = logits.to(torch.float32, copy=True)  # penalties and masks write in place
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        self._apply_bitmask(logits, bitmask)
        self._apply_penalties(logits, requests)
        self._mask_stop_tokens_before_min(logits, requests)
        token_ids = greedy_tokens(logits)
        random_rows = [row for row, p in enumerate(params) if not p.is_greedy]
        if len(random_rows) == len(requests):
            token_ids = self._sample(logits, requests)
        elif random_rows:
            rows = to_device(random_rows, torch.long, logits.device)
            token_ids.index_copy_(0, rows, self._sample(logits.index_select(0, rows),
                                                        [requests[i] for i in random_rows]))
        return DeviceSample(token_ids, raw_logprobs, num_logprobs)

    @staticmethod
    def _apply_bitmask(logits: torch.Tensor, bitmask) -> None:
        if bitmask is not None:
            words = bitmask.words.to(logits.device, non_blocking=True)  # pinned on CUDA: no wait
            apply_token_bitmask(logits, words, to_device(bitmask.rows, torch.long, logits.device))

    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request]) -> None:
        for row, request in enumerate(requests):
            p = request.sampling_params
            if not p.needs_penalties:
                continue
            vocab = logits.shape[-1]
            if p.repetition_penalty != 1.0:
                seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
                seen[to_device(request.all_token_ids, torch.long, logits.device)] = True
                row_logits = logits[row]
                penalized = torch.where(row_logits > 0, row_logits / p.repetition_penalty,
                                        row_logits * p.repetition_penalty)
                logits[row] = torch.where(seen, penalized, row_logits)
            if request.output_token_ids and (p.frequency_penalty or p.presence_penalty):
                output = to_device(request.output_token_ids, torch.long, logits.device)
                counts = torch.bincount(output, minlength=vocab)[:vocab].to(logits.dtype)
                logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)

    @staticmethod
    def _mask_stop_tokens_before_min(logits: torch.Tensor, requests: list[Request]) -> None:
        for row, request in enumerate(requests):
            p = request.sampling_params
            if request.num_output_tokens < p.min_tokens:
                stop_ids = [t for t in (*p.all_stop_token_ids, *p.stop_token_ids) if t < logits.shape[-1]]
                if p.ignore_eos:
                    stop_ids = [t for t in p.stop_token_ids if t < logits.shape[-1]]
                if stop_ids:
                    logits[row].index_fill_(0, to_device(stop_ids, torch.long, logits.device), float("-inf"))

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        return self.sample_from(sampling_probs(logits, [r.sampling_params for r in requests]), requests)

    def sample_from(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """One token per row of `probs` (need not sum to 1), drawn with its request's generator."""
        race = torch.empty_like(probs)
        for row, request in enumerate(requests):
            race[row].exponential_(generator=self.generator_for(request))
        return (probs / race).argmax(dim=-1)

    def generator_for(self, request: Request) -> torch.Generator:
        seed = request.sampling_params.seed
        if seed is None:
            return self.generator
        generator = self.request_generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed + request.index)
            self.request_generators[request.request_id] = generator
        return generator


def _plain_greedy(request) -> bool:
    p = request.sampling_params
    return p.is_greedy and not p.needs_penalties and request.num_output_tokens >= p.min_tokens


def sampling_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """The distribution each row samples from: float32 logits after temperature, top-k, top-p, min-p
    (every row random: temperature > 0)."""
    temperature = to_device([p.temperature for p in params], torch.float32, logits.device)
    logits = logits / temperature[:, None]
    if any(p.top_k or p.top_p < 1.0 or p.min_p > 0 for p in params):
        logits = filter_logits(logits, [p.top_k for p in params], [p.top_p for p in params],
                               [p.min_p for p in params])
    return torch.softmax(logits, dim=-1)


def filter_logits(logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k, nucleus (top-p) and min-p sets."""
    vocab = logits.shape[-1]
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)
    k = to_device([kk if kk > 0 else vocab for kk in top_k], torch.long, device)
    remove = ranks[None, :] >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    p = to_device(top_p, probs.dtype, device)
    mass_before = probs.cumsum(dim=-1) - probs  # the top token always stays
    remove |= mass_before >= p[:, None]
    m = to_device(min_p, probs.dtype, device)
    remove |= probs < (m[:, None] * probs[:, :1])
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def top_logprobs(logprobs: torch.Tensor, token_id: int, num: int) -> list[tuple[int, float, int]]:
    """The chosen token's (id, logprob, rank) followed by the `num` most likely tokens."""
    chosen = logprobs[token_id]
    rank = int((logprobs > chosen).sum()) + 1
    entries = [(token_id, float(chosen), rank)]
    if num:
        values, ids = logprobs.topk(num)
        entries += [(int(i), float(v), r + 1) for r, (v, i) in enumerate(zip(values.tolist(), ids.tolist()))]
    return entries
