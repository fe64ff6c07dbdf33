"""Draft-model speculation: a smaller model with the target's vocabulary proposes the next k tokens.

The model runner loads the draft beside the target (same device and dtype, its own weights). The
draft has KV tensors of its own with the target's number of blocks and block size, and reads the
target's block tables: a block id names both models' KV of the same tokens, so one block manager
serves both (the KV budget counts both per block), and prefix caching and preemption need nothing
more. What keeps that right: after each step, every token whose KV the target has computed has the
draft's KV too, so a block in the prefix cache holds both.

After each step (ModelRunner.fetch), one draft forward catches up on the tokens it lacks (the
prompt chunks the target prefilled; after speculation, the accepted proposals it did not feed
itself; the newly sampled token) and yields the first proposal; then k - 1 decode steps, replayed
from CUDA graphs on CUDA, yield the others. A catch-up of one or two tokens runs as one-token rows
(the usual case: the new token, after all k proposals were accepted also the last one), so that
forward is a decode step too. Greedy requests get the draft's argmax; sampled ones a draw from
the draft's distribution q (their temperature, top-k, top-p, min-p and generator), kept for the
rejection sampler (engine/spec_decode/rejection_sampler.py) in the next step's verification.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.layers.attention import Attention, set_forward_context
from engine.layers.sampler import Sampler, sampling_probs, to_device
from engine.spec_decode.rejection_sampler import rejection_sample
from engine.worker.cpu_kv_budget import kv_bytes_per_token
from engine.worker.cuda_graphs import CudaGraphRunner
from engine.worker.input_buffers import InputBuffers
from engine.worker.request_states import CachedRequestState

MAX_DECODE_ROWS = 2  # a catch-up of at most this many tokens runs as one-token rows (a decode step)


def load_draft_config(draft: str, target_config, max_model_len: int):
    """The draft's source and config; ValueError unless it shares the target's vocabulary and covers
    max_model_len."""
    from engine.weights import load_model_config, resolve_model

    source = resolve_model(draft)
    config = load_model_config(source)
    if config.vocab_size != target_config.vocab_size:
        raise ValueError(f"speculative_config.model {draft!r} has a vocabulary of {config.vocab_size} tokens, the "
                         f"target {target_config.vocab_size}: a draft model must share the target's vocabulary")
    if config.max_position_embeddings < max_model_len:
        raise ValueError(f"speculative_config.model {draft!r} has a context of {config.max_position_embeddings} "
                         f"tokens, less than max_model_len={max_model_len}: lower max_model_len")
    return source, config


@dataclass(slots=True, eq=False)
class DraftQuery:
    """One query of a draft forward, shaped as InputBuffers.prepare reads a request state: tokens from
    position `num_computed_tokens` on; those past `all_token_ids` come from the last draft step."""

    request_id: str
    all_token_ids: list[int]  # the request state's own lists, not copies
    block_ids: tuple[list[int]]  # the target's group 0 list, not a copy
    num_computed_tokens: int = 0
    spec_token_ids: tuple = ()


@dataclass(slots=True, eq=False)
class DraftProgress:
    """What the draft holds of one request. The runner's state object stands for one life of the
    request: a preempted request comes back as a new state, and the draft starts it afresh."""

    state: CachedRequestState
    num_computed: int  # leading positions whose draft KV is right
    last_query: DraftQuery  # its newest token's query (the same object each time: its block-table row stays)
    extra_query: DraftQuery  # the token before it, in a catch-up of two
    proposals: list[int] = field(default_factory=list)  # after num_computed; all but the last were fed
    probs: list[torch.Tensor] | None = None  # the q each proposal was drawn from (sampled requests)

    def confirm(self) -> None:
        """Count the fed proposals the step accepted: same tokens after the same prefix, so their KV is right."""
        tokens, fed = self.state.all_token_ids, self.proposals[:-1]
        matched = 0
        while (matched < len(fed) and self.num_computed + matched < len(tokens)
               and tokens[self.num_computed + matched] == fed[matched]):
            matched += 1
        self.num_computed += matched
        self.proposals, self.probs = [], None


class DraftModelProposer:
    def __init__(self, model: torch.nn.Module, model_config, sampler: Sampler, states: dict, *, token_id_limit: int,
                 block_size: int, max_model_len: int, max_num_batched_tokens: int, max_num_seqs: int,
                 device: torch.device, dtype: torch.dtype, cuda_graphs: bool) -> None:
        self.model = model
        self.vocab_size = model_config.vocab_size
        self.token_id_limit = token_id_limit  # the target's: ids it never samples are never proposed
        self.sampler = sampler  # the runner's: a seeded request draws its proposals from its own generator
        self.states = states  # the runner's RequestStates
        self.block_size = block_size
        self.device, self.dtype = device, dtype
        self.attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.kv_cache: torch.Tensor | None = None
        self.progress: dict[str, DraftProgress] = {}
        # A catch-up holds each request's step tokens and two more, in up to two rows per request.
        self.inputs = InputBuffers(max_num_batched_tokens + 2 * max_num_seqs, 2 * max_num_seqs, max_model_len,
                                   block_size, device)
        self.cuda_graphs = CudaGraphRunner(model, self.inputs, max_num_seqs) if cuda_graphs else None

    # -- set-up -------------------------------------------------------------------------------------

    def kv_bytes_per_token(self) -> int:
        layer = self.attention_layers[0]
        return kv_bytes_per_token(len(self.attention_layers), layer.num_kv_heads, layer.head_dim, self.dtype.itemsize)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        from engine.worker.model_runner import allocate_kv_cache

        self.kv_cache = allocate_kv_cache(self.attention_layers, num_blocks, self.block_size, self.dtype, self.device)

    def capture_cuda_graphs(self) -> None:
        if self.cuda_graphs is not None:
            self.cuda_graphs.capture()

    # -- verification -------------------------------------------------------------------------------

    def rejection_sample(self, logits: torch.Tensor, token_ids: torch.Tensor, speculating: dict,
                         sampling: list) -> None:
        """Redraw, in `token_ids`, the rows of each request whose proposals were drawn from the draft's
        distribution: rejection sampling against the target's (`logits`, the step's sampled rows)."""
        for request_id, (first, drafts) in speculating.items():
            state = sampling[first][0]
            progress = self.progress.get(request_id)
            if (progress is None or progress.state is not state or progress.probs is None
                    or progress.num_computed != state.num_computed_tokens + 1
                    or progress.proposals[:len(drafts)] != drafts):
                continue  # greedy, or not this draft's proposals: the plain check is exact for them
            num = len(drafts)
            rows = slice(first, first + num + 1)
            target_probs = sampling_probs(logits[rows].float(), [state.sampling_params] * (num + 1))
            generator = self.sampler.generator_for(state)
            uniform = torch.rand(num, generator=generator, device=logits.device)
            token_ids[rows] = rejection_sample(
                target_probs, to_device(drafts, torch.long, logits.device), torch.stack(progress.probs[:num]),
                uniform, lambda probs: self.sampler.sample_from(probs, [state] * probs.shape[0]))

    # -- proposing ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, batch: list[tuple[CachedRequestState, int]], sampled_ids, num_to_propose: dict[str, int]
                ) -> dict[str, list[int]]:
        """After a step of `batch` ((state, scheduled tokens), its tokens recorded in the states): catch
        the draft up on it and propose for the requests in `num_to_propose` that sampled (`sampled_ids`)."""
        self.progress = {r: p for r, p in self.progress.items() if self.states.get(r) is p.state}
        decodes, extras, prefills = [], [], []  # (progress, tokens, proposals to make)
        for state, num_new in batch:
            progress = self._progress_of(state)
            progress.confirm()
            sampled = state.request_id in sampled_ids
            count = num_to_propose.get(state.request_id, 0) if sampled else 0
            tokens = state.all_token_ids
            if count:  # up to the new token, which it feeds (its slot is reserved)
                end = len(tokens)
                start = min(progress.num_computed, end - 1)
            else:  # up to what the target computed
                end = min(state.num_computed_tokens + num_new, len(tokens) - sampled)
                start = progress.num_computed
            if end <= start:
                continue
            progress.num_computed = end
            if end - start > MAX_DECODE_ROWS:
                progress.last_query.num_computed_tokens = start
                prefills.append((progress, end - start, count))
                continue
            progress.last_query.num_computed_tokens = end - 1
            decodes.append((progress, 1, count))
            if end - start == 2:
                progress.extra_query.num_computed_tokens = start
                extras.append((progress, 1, 0))
        decodes.sort(key=lambda item: -item[2])  # proposers first, the most proposals first (as below)
        queries = [(p.last_query, n) for p, n, _ in decodes] + [(p.extra_query, n) for p, n, _ in extras] + [
            (p.last_query, n) for p, n, _ in prefills]
        if not queries:
            return {}
        proposers, last_row = [], 0  # (progress, proposals, the row of its new token)
        for progress, n, count in (*decodes, *extras, *prefills):
            last_row += n
            if count:
                proposers.append((progress, count, last_row - 1))
        proposers.sort(key=lambda item: -item[1])  # each later decode step runs over a prefix of them
        hidden = self._forward(queries, [row for _, _, row in proposers])
        if not proposers:
            return {}
        return self._propose_from(hidden, [(progress, count) for progress, count, _ in proposers])

    def _propose_from(self, hidden: torch.Tensor, proposers: list[tuple[DraftProgress, int]]) -> dict[str, list[int]]:
        """Draw the first proposals from `hidden` (one row per proposer, most proposals first), then
        run a decode step per further proposal, each over the proposers that still want one."""
        states = [p.state for p, _ in proposers]
        tokens, probs = self._draw(hidden, states)
        steps = [(tokens, probs)]
        for step in range(1, proposers[0][1]):
            active = [p for p, count in proposers if count > step]
            for progress in active:  # proposal `step` sits right after the new token
                progress.last_query.num_computed_tokens = len(progress.state.all_token_ids) - 1 + step
            hidden = self._forward([(p.last_query, 1) for p in active], list(range(len(active))),
                                   feed=tokens[:len(active)])
            tokens, probs = self._draw(hidden, states[:len(active)])
            steps.append((tokens, probs))
        drawn = torch.cat([tokens for tokens, _ in steps]).tolist()  # the one wait for the device
        offset = 0
        for tokens, probs in steps:
            for row in range(tokens.shape[0]):
                progress = proposers[row][0]
                progress.proposals.append(drawn[offset + row])
                if row in probs:
                    progress.probs = (progress.probs or []) + [probs[row]]
            offset += tokens.shape[0]
        return {progress.state.request_id: progress.proposals for progress, _ in proposers}

    def _draw(self, hidden: torch.Tensor, states: list[CachedRequestState]) -> tuple[torch.Tensor, dict]:
        """One proposal per row: the argmax for greedy requests, else a draw from q (returned by row)."""
        logits = self.model.compute_logits(hidden)[:, :self.vocab_size]
        if self.token_id_limit < logits.shape[1]:
            logits[:, self.token_id_limit:] = float("-inf")
        tokens = logits.argmax(dim=-1)
        random_rows = [row for row, state in enumerate(states) if not state.sampling_params.is_greedy]
        if not random_rows:
            return tokens, {}
        rows = to_device(random_rows, torch.long, logits.device)
        requests = [states[row] for row in random_rows]
        probs = sampling_probs(logits.index_select(0, rows).float(), [r.sampling_params for r in requests])
        tokens.index_copy_(0, rows, self.sampler.sample_from(probs, requests))
        return tokens, {row: probs[i] for i, row in enumerate(random_rows)}

    def _forward(self, queries: list[tuple[DraftQuery, int]], sample_rows: list[int],
                 feed: torch.Tensor | None = None) -> torch.Tensor:
        """The draft's hidden states at `sample_rows`; `feed` gives the input tokens of the first rows
        (one-token queries past their known tokens), on the device."""
        num_tokens = sum(n for _, n in queries)
        graph_size = None
        if self.cuda_graphs is not None and num_tokens == len(queries):
            graph_size = self.cuda_graphs.padded_size(num_tokens)
        inputs = self.inputs.prepare(queries, sample_rows, graph_size)
        if feed is not None:
            inputs.input_ids[:feed.shape[0]].copy_(feed)
        if graph_size is not None:
            hidden = self.cuda_graphs.replay(graph_size)
        else:
            with set_forward_context(inputs.metadata):
                hidden = self.model(inputs.input_ids, inputs.positions)
        return hidden.index_select(0, inputs.sample_rows)

    def _progress_of(self, state: CachedRequestState) -> DraftProgress:
        progress = self.progress.get(state.request_id)
        if progress is None or progress.state is not state:
            # New to the runner: the prefix cache's blocks (before num_computed_tokens) hold the draft's KV.
            # It reads the target's KV cache group 0 (full attention when the target mixes kinds).
            queries = [DraftQuery(state.request_id, state.all_token_ids, (state.block_ids[0],)) for _ in range(2)]
            progress = DraftProgress(state, state.num_computed_tokens, *queries)
            self.progress[state.request_id] = progress
        return progress
