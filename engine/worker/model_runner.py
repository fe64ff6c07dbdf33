"""Owns the model and the KV cache on one device; turns a SchedulerOutput into sampled tokens.

Each step: bring the runner's request states up to date from the step contract
(request_states.py), flatten the scheduled tokens of all requests (decodes first) into
`input_ids`, `positions` and `slot_mapping` (see input_buffers.py), run the model (replaying a
CUDA graph when every request decodes one token, see cuda_graphs.py), compute logits only where a
token is sampled (or prompt logprobs are wanted), and sample. `launch()` queues all that on the
device without waiting; `fetch()` waits for the sampled tokens, the step's one wait for the
device. Async scheduling launches step N+1 before fetching step N: a token step N samples is fed
to step N+1 on the device.

Under tensor parallelism every rank runs the same step on its shard of the model (see
engine/distributed/); the logits are gathered on every rank, and only rank 0 (the driver) samples.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig
from engine.core.kv_cache_groups import KVCacheGroup, group_layers, group_size
from engine.core.scheduler_output import SchedulerOutput
from engine.distributed import parallel_state
from engine.layers.attention import Attention, AttentionMetadata, set_forward_context
from engine.layers.prepacked_linear import can_prepack, prepack_linear_weights, weight_bytes
from engine.layers.sampler import DeviceSample, Sampler, to_device, top_logprobs
from engine.lora.config import LoRAConfig
from engine.models.registry import get_model_class
from engine.spec_decode.config import SpeculativeConfig
from engine.weights import ModelSource, load_weights_into
from engine.weights.skip_default_init import skip_default_init
from engine.worker.cpu_kv_budget import available_memory_bytes, cpu_kv_cache_bytes, kv_bytes_per_token
from engine.worker.cuda_graphs import CudaGraphRunner
from engine.worker.input_buffers import InputBuffers, StepInputs
from engine.worker.request_states import CachedRequestState, RequestStates

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
                "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def allocate_kv_cache(attention_layers: list[Attention], num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device, groups: list[KVCacheGroup] | None = None) -> torch.Tensor | None:
    """One tensor for the K and V blocks of every layer, bound to the layers (None and unbound for 0
    blocks). With several KV cache groups, a block holds one group's layers: layer j of each group
    uses slot j (engine/core/kv_cache_groups.py)."""
    for layer in attention_layers:
        layer.key_cache = layer.value_cache = torch.empty(0)
    if num_blocks == 0:
        return None
    groups = groups or group_layers([None] * len(attention_layers))
    layer = attention_layers[0]
    shape = (2, group_size(groups), num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
    # Zeroed: padded slots are masked, but 0 * NaN from uninitialised memory would still be NaN.
    kv_cache = torch.zeros(shape, dtype=dtype, device=device)
    for group_id, group in enumerate(groups):
        for slot, index in enumerate(group.layer_indices):
            layer = attention_layers[index]
            layer.key_cache, layer.value_cache, layer.kv_group = kv_cache[0, slot], kv_cache[1, slot], group_id
    return kv_cache


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, model_config) -> torch.dtype:
    if name != "auto":
        return _DTYPE_NAMES[name]
    if device.type == "cpu":
        return torch.float32
    checkpoint = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    checkpoint = _DTYPE_NAMES.get(str(checkpoint).replace("torch.", ""), torch.bfloat16)
    return torch.bfloat16 if checkpoint == torch.float32 else checkpoint


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)  # a speculating request: its last token
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)  # ... and all it produced this step
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)  # a draft model's proposals for the next
    logprobs: dict[str, list[tuple[int, float, int]]] = field(default_factory=dict)
    # request id -> (first prompt position covered, one entry list per position)
    prompt_logprobs: dict[str, tuple[int, list[list[tuple[int, float, int]]]]] = field(default_factory=dict)


@dataclass
class LaunchedStep:
    """A step queued on the device; `fetch()` turns it into a ModelRunnerOutput."""

    output: ModelRunnerOutput  # prompt logprobs are in already
    batch: list[tuple[CachedRequestState, int]] = field(default_factory=list)  # (request, tokens), decodes first
    num_draft_tokens_to_propose: dict[str, int] = field(default_factory=dict)  # the step contract's
    sampling: list[tuple[CachedRequestState, int]] = field(default_factory=list)  # (request, its token's position)
    # A speculating request samples after its last token and after each proposal: its first row in
    # `sampling` (its rows follow one another) and its proposals.
    speculating: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    sample: DeviceSample | None = None  # rank 0 only
    host_tokens: torch.Tensor | None = None  # the sampled tokens, copied to the host when `ready`
    ready: torch.cuda.Event | None = None
    # Rank 0 of a step with grammar-constrained rows: the logits wait for `sample_constrained()`.
    pending_logits: torch.Tensor | None = None
    constrained_rows: list[int] = field(default_factory=list)  # rows of `sampling` under a grammar

    @property
    def awaits_bitmask(self) -> bool:
        return self.pending_logits is not None

    def constrained_request_ids(self) -> list[tuple[int, str]]:
        """(row, request id) of the rows whose token must follow a grammar."""
        return [(row, self.sampling[row][0].request_id) for row in self.constrained_rows]


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config, source: ModelSource, max_model_len: int,
                 max_num_batched_tokens: int, token_id_limit: int | None = None) -> None:
        """`token_id_limit`: ids from it up are never sampled (a dummy model's beyond its borrowed
        tokenizer: engine/tokenization.py's `token_id_limit`)."""
        self.config = config
        self.model_config = model_config
        self.token_id_limit = token_id_limit or model_config.vocab_size
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device, model_config)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.is_driver = parallel_state.tp_rank() == 0  # the rank that samples; the others only compute
        torch.manual_seed(config.seed)
        speculative_config = SpeculativeConfig.from_dict(config.speculative_config)
        draft = None
        if speculative_config is not None and speculative_config.uses_draft_model:
            from engine.spec_decode.draft_model import load_draft_config

            draft = load_draft_config(speculative_config.model, model_config, max_model_len)  # fails fast
        lora_config = LoRAConfig.from_engine_config(config)
        self.model = self._load_model(model_config, source, takes_adapters=lora_config is not None)
        self.lora_manager = None  # LoRA layers are swapped in after loading (the base weights' names stay)
        if lora_config is not None:
            from engine.lora.manager import LoRAModelManager

            self.lora_manager = LoRAModelManager(self.model, model_config, lora_config, max_num_batched_tokens,
                                                 self.device)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        windows = [layer.sliding_window for layer in self.attention_layers]
        if config.disable_hybrid_kv_cache_manager and len(set(windows)) > 1:
            windows = [None] * len(windows)  # the blocks' window: the sliding layers' kernels still slide
        self.kv_cache_groups = group_layers(windows)
        if len(self.kv_cache_groups) > 1 and len({(l.num_kv_heads, l.head_dim) for l in self.attention_layers}) > 1:
            raise ValueError("KV cache groups need every attention layer to have the same KV shape")
        self.sampler = Sampler(config.seed, self.device)
        self.states = RequestStates()
        self.drafter = None  # draft-model speculation (engine/spec_decode/draft_model.py)
        if draft is not None:
            from engine.spec_decode.draft_model import DraftModelProposer

            draft_source, draft_config = draft
            self.drafter = DraftModelProposer(
                self._load_model(draft_config, draft_source), draft_config, self.sampler, self.states,
                token_id_limit=self.token_id_limit, block_size=self.block_size, max_model_len=max_model_len,
                max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
                device=self.device, dtype=self.dtype,
                cuda_graphs=self.device.type == "cuda" and not config.enforce_eager)
        self.num_blocks = self._agree(self._decide_num_blocks())
        self._allocate_kv_cache(self.num_blocks)
        self._last_sampled: tuple[torch.Tensor, dict[str, int]] | None = None  # the last launched step's tokens
        on_cuda = self.device.type == "cuda"
        # Two steps at most are between launch and fetch: one pinned buffer each, used in turn.
        self._host_tokens = [torch.zeros(max_num_batched_tokens, dtype=torch.long, pin_memory=on_cuda)
                             for _ in range(2 if on_cuda else 0)]
        self._launches = 0
        self.inputs = InputBuffers(max_num_batched_tokens, config.max_num_seqs, max_model_len, self.block_size,
                                   self.device, len(self.kv_cache_groups))
        self.cuda_graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            max_batch = min(config.max_num_seqs, max_num_batched_tokens)
            self.cuda_graphs = CudaGraphRunner(self.model, self.inputs, max_batch,
                                               self.lora_manager and self.lora_manager.prepare_capture)
            self.cuda_graphs.capture()
        if self.drafter is not None:
            self.drafter.capture_cuda_graphs()

    # -- set-up -------------------------------------------------------------------------------------

    def _load_model(self, model_config, source: ModelSource, takes_adapters: bool = False) -> torch.nn.Module:
        """On the CPU in float32 the linear weights are then packed for oneDNN (see
        engine/layers/prepacked_linear.py), unless LoRA will wrap them or tensor parallelism shards them."""
        model_class = get_model_class(model_config)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            if parallel_state.tp_world_size() > 1:
                from engine.distributed.shard import build_sharded_model

                model = build_sharded_model(model_class, model_config, self.device, self.dtype)
            else:
                # A dummy fill writes every weight next: torch's default init would write them twice.
                with torch.device(self.device), skip_default_init() if source.kind == "dummy" else nullcontext():
                    model = model_class(model_config)
        finally:
            torch.set_default_dtype(previous)
        with torch.no_grad():
            load_weights_into(model, source, self.config.seed)
        if can_prepack(self.device, self.dtype) and not takes_adapters and parallel_state.tp_world_size() == 1:
            prepack_linear_weights(model)
        # Rotary tables stay float32 for accuracy; everything else runs in the chosen dtype.
        return model.eval()

    def _agree(self, num_blocks: int) -> int:
        """Every rank's cache must have the same blocks: the smallest any rank can hold."""
        count = torch.tensor([num_blocks], device=self.device)
        return int(parallel_state.all_reduce(count, op=torch.distributed.ReduceOp.MIN).item())

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits; under tensor parallelism each rank's vocabulary slice is gathered."""
        logits = parallel_state.all_gather_last_dim(self.model.compute_logits(hidden_states))
        logits = logits[:, :self.model_config.vocab_size]
        if self.token_id_limit < logits.shape[1]:
            logits[:, self.token_id_limit:] = float("-inf")
        return logits

    def _kv_bytes_per_block(self) -> int:
        """A block holds one KV cache group's layers (and a draft model's: it shares the blocks; with
        several groups it reads only group 0's, so its share of the other groups' blocks goes unused)."""
        layer = self.attention_layers[0]
        target = kv_bytes_per_token(group_size(self.kv_cache_groups), layer.num_kv_heads, layer.head_dim,
                                    self.dtype.itemsize)
        return (target + (self.drafter.kv_bytes_per_token() if self.drafter is not None else 0)) * self.block_size

    def _kv_bytes_per_token(self) -> int:
        """What a token of a sequence takes at most: its slot in a block of every group."""
        return len(self.kv_cache_groups) * self._kv_bytes_per_block() // self.block_size

    def _decide_num_blocks(self) -> int:
        if self.config.num_gpu_blocks_override:
            return self.config.num_gpu_blocks_override
        if self.config.kv_cache_memory_bytes:
            budget = self.config.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = self._cpu_kv_budget()
        num_blocks = budget // self._kv_bytes_per_block()
        if num_blocks < 2:
            raise ValueError(f"KV cache budget of {budget} bytes holds fewer than 2 blocks")
        return int(num_blocks)

    def _cpu_kv_budget(self) -> int:
        """Enough for max_num_seqs full sequences, within this rank's share of a quarter of free memory."""
        available = available_memory_bytes()
        budget = cpu_kv_cache_bytes(self._kv_bytes_per_token(), self.block_size, self.config.max_num_seqs,
                                    self.max_model_len, available // parallel_state.tp_world_size())
        logger.info("CPU KV cache %.2f GiB (%d tokens) for max_num_seqs=%d x max_model_len=%d, of %.2f GiB "
                    "available; --kv-cache-memory-bytes overrides", budget / 2**30,
                    budget // self._kv_bytes_per_token(), self.config.max_num_seqs, self.max_model_len,
                    available / 2**30)
        return budget

    def _cuda_kv_budget(self) -> int:
        """gpu_memory_utilization of the card, minus weights and the peak of a full-budget forward."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._profile_run()
        peak = torch.cuda.max_memory_allocated()
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()
        budget = int(total * self.config.gpu_memory_utilization) - peak - max(used_by_others, 0)
        logger.info("KV cache budget %.2f GiB (peak of profile run %.2f GiB)", budget / 2**30, peak / 2**30)
        return max(budget, 0)

    @torch.inference_mode()
    def _profile_run(self) -> None:
        num_tokens = min(self.max_num_batched_tokens, self.max_model_len)
        num_blocks = -(-num_tokens // self.block_size) + 1
        self._allocate_kv_cache(num_blocks)
        num_groups = len(self.kv_cache_groups)  # every group writes the same blocks: only the peak matters
        block_table = torch.arange(1, num_blocks, device=self.device).expand(num_groups, 1, -1)
        meta = AttentionMetadata(
            slot_mapping=(torch.arange(num_tokens, device=self.device) + self.block_size).expand(num_groups, -1),
            block_tables=block_table, seq_lens=torch.tensor([num_tokens], device=self.device), num_decodes=0,
            decode_max_blocks=0, decode_max_seq_len=0, seq_lens_cpu=[num_tokens], query_start_loc_cpu=[0, num_tokens])
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        with set_forward_context(meta):
            hidden = self.model(input_ids, torch.arange(num_tokens, device=self.device))
        self.compute_logits(hidden[: self.config.max_num_seqs])
        torch.cuda.synchronize()
        self._allocate_kv_cache(0)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache = allocate_kv_cache(self.attention_layers, num_blocks, self.block_size, self.dtype, self.device,
                                          self.kv_cache_groups)
        if self.drafter is not None:
            self.drafter.allocate_kv_cache(num_blocks)

    def memory_in_use(self) -> int:
        """Bytes of device memory held: the allocator's count on CUDA, weights plus KV cache on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        models, caches = [self.model], [self.kv_cache]
        if self.drafter is not None:
            models.append(self.drafter.model)
            caches.append(self.drafter.kv_cache)
        return sum(map(weight_bytes, models)) + sum(t.numel() * t.element_size() for t in caches)

    # -- one step -----------------------------------------------------------------------------------

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.fetch(self.launch(scheduler_output))

    @torch.inference_mode()
    def launch(self, scheduler_output: SchedulerOutput) -> LaunchedStep:
        for request_id in self.states.apply(scheduler_output):
            self.sampler.forget(request_id)
        sampling_ids = scheduler_output.sampling_req_ids
        batch = sorted(((self.states[request_id], num_new)
                        for request_id, num_new in scheduler_output.num_scheduled_tokens.items()),
                       key=lambda item: item[1] != 1)  # decodes first
        sample_rows, row = [], -1
        launched = LaunchedStep(ModelRunnerOutput(), batch, scheduler_output.num_draft_tokens_to_propose)
        constrained_ids = scheduler_output.structured_output_req_ids
        for state, num_new in batch:
            row += num_new
            if state.spec_token_ids:
                num_drafts = len(state.spec_token_ids)
                launched.speculating[state.request_id] = (len(launched.sampling), state.spec_token_ids)
                for j in range(num_drafts + 1):  # after the last token, then after each proposal
                    sample_rows.append(row - num_drafts + j)
                    launched.sampling.append((state, state.num_computed_tokens + 1 + j))
            elif state.request_id in sampling_ids:
                sample_rows.append(row)
                if state.request_id in constrained_ids:
                    launched.constrained_rows.append(len(launched.sampling))
                launched.sampling.append((state, state.num_computed_tokens + num_new))
        num_tokens = row + 1
        graph_size = None
        if self.cuda_graphs is not None and num_tokens == len(batch):
            graph_size = self.cuda_graphs.padded_size(num_tokens)
        inputs = self.inputs.prepare(batch, sample_rows, graph_size)
        if self.lora_manager is not None:
            self.lora_manager.prepare_step([(state.lora_request, num_new) for state, num_new in batch],
                                           graph_size or num_tokens)
        if inputs.unknown_token_rows:
            self._feed_sampled_tokens(inputs)
        if graph_size is not None:
            hidden = self.cuda_graphs.replay(graph_size)
        else:
            with set_forward_context(inputs.metadata):
                hidden = self.model(inputs.input_ids, inputs.positions)

        starts = inputs.metadata.query_start_loc_cpu
        for seq, (state, _) in enumerate(batch):
            if state.sampling_params.prompt_logprobs is not None:
                self._prompt_logprobs(state, hidden[starts[seq]:starts[seq + 1]], launched.output)
        if sample_rows:
            self._sample(hidden.index_select(0, inputs.sample_rows), launched)
        return launched

    def _sample(self, hidden: torch.Tensor, launched: LaunchedStep) -> None:
        """Sample on rank 0, share the tokens with every rank, start their copy to the host. A step
        with grammar rows stops at the logits on rank 0 until `sample_constrained()` brings the masks
        (the other ranks go on to wait for rank 0's tokens)."""
        logits = self.compute_logits(hidden)
        if self.is_driver and launched.constrained_rows:
            launched.pending_logits = logits
            return
        self._sample_logits(logits, launched)

    @torch.inference_mode()
    def sample_constrained(self, launched: LaunchedStep, bitmask) -> None:
        """Rank 0: sample a step that awaited its grammar masks (a GrammarBitmask, or None when
        every constrained request has finished meanwhile)."""
        logits, launched.pending_logits = launched.pending_logits, None
        self._sample_logits(logits, launched, bitmask)

    def _sample_logits(self, logits: torch.Tensor, launched: LaunchedStep, bitmask=None) -> None:
        if self.is_driver:
            launched.sample = self.sampler.sample(logits, [state for state, _ in launched.sampling], bitmask)
            tokens = launched.sample.token_ids
            if self.drafter is not None and launched.speculating:
                self.drafter.rejection_sample(logits, tokens, launched.speculating, launched.sampling)
        else:
            tokens = torch.empty(len(launched.sampling), dtype=torch.long, device=self.device)
        tokens = parallel_state.broadcast_from_driver(tokens)
        self._last_sampled = (tokens, {state.request_id: i for i, (state, _) in enumerate(launched.sampling)})
        if self.device.type != "cuda":
            launched.host_tokens = tokens
            return
        self._launches += 1
        launched.host_tokens = self._host_tokens[self._launches % 2][:tokens.shape[0]]
        launched.host_tokens.copy_(tokens, non_blocking=True)
        launched.ready = torch.cuda.Event()
        launched.ready.record()

    def _feed_sampled_tokens(self, inputs: StepInputs) -> None:
        """Write the tokens the last launched step samples into this step's inputs, on the device."""
        tokens, row_of = self._last_sampled or (None, {})
        missing = [r for r in inputs.unknown_token_requests if r not in row_of]
        if missing:
            raise RuntimeError(f"the input token of {missing} is neither known nor sampled by the last step")
        rows = to_device(inputs.unknown_token_rows, torch.long, self.device)
        source = to_device([row_of[r] for r in inputs.unknown_token_requests], torch.long, self.device)
        inputs.input_ids.index_copy_(0, rows, tokens.index_select(0, source))

    def fetch(self, launched: LaunchedStep) -> ModelRunnerOutput:
        """Wait for a launched step's tokens; record them in the request states; rank 0's output. A
        draft model then catches up on the step and proposes the next step's tokens."""
        output = self._fetch_sampled(launched)
        if self.drafter is not None:
            output.draft_token_ids = self.drafter.propose(launched.batch, output.sampled_token_ids,
                                                          launched.num_draft_tokens_to_propose)
        return output

    def _fetch_sampled(self, launched: LaunchedStep) -> ModelRunnerOutput:
        output = launched.output
        if not launched.sampling:
            return output
        if launched.ready is not None:
            launched.ready.synchronize()
        token_ids = launched.host_tokens.tolist()
        if launched.speculating:
            token_ids = self._verify(launched, token_ids, output)
        for (state, position), token_id in zip(launched.sampling, token_ids):
            if token_id is not None:
                state.set_sampled(position, token_id)
        if launched.sample is not None:
            sampled = launched.sample.resolve([t or 0 for t in token_ids])
            for (state, _), token_id, logprobs in zip(launched.sampling, token_ids, sampled.logprobs):
                if token_id is not None:
                    output.sampled_token_ids[state.request_id] = token_id
                if logprobs is not None:
                    output.logprobs[state.request_id] = logprobs
        return output

    @staticmethod
    def _verify(launched: LaunchedStep, token_ids: list[int], output: ModelRunnerOutput) -> list[int | None]:
        """Keep, per speculating request, the samples up to the first that differs from the proposal it
        checks (that sample included): each row was sampled from the target's own distribution, so a
        proposal is accepted with the target's probability of it, and a rejected one is replaced by a
        sample of the target's distribution without it: exactly the target's distribution (proposals
        are deterministic here). Rows past the first mismatch become None."""
        token_ids = list(token_ids)
        for request_id, (first, drafts) in launched.speculating.items():
            kept = []
            for j in range(len(drafts) + 1):
                kept.append(token_ids[first + j])
                if j == len(drafts) or token_ids[first + j] != drafts[j]:
                    break
            token_ids[first + len(kept):first + len(drafts) + 1] = [None] * (len(drafts) + 1 - len(kept))
            output.spec_token_ids[request_id] = kept
        return token_ids

    def _prompt_logprobs(self, request: CachedRequestState, hidden: torch.Tensor, output: ModelRunnerOutput) -> None:
        """Logprob of each next prompt token this chunk predicts (row p predicts token p + 1).

        Full-vocabulary logits for a whole chunk (8192 positions x 128k vocab in float32: 4 GiB, twice
        with the log-softmax) could run the device out of memory, so they are computed at most
        max_num_seqs positions at a time: no more than sampling a full batch needs."""
        start = request.num_computed_tokens
        count = min(hidden.shape[0], request.num_prompt_tokens - 1 - start)
        if count <= 0:
            return
        num = request.sampling_params.prompt_logprobs
        targets = request.prompt_token_ids[start + 1:start + 1 + count]
        entries, rows = [], self.config.max_num_seqs
        for first in range(0, count, rows):  # every rank runs the same slices (the logits are gathered)
            logits = self.compute_logits(hidden[first:min(first + rows, count)])
            if self.is_driver:
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                entries += [top_logprobs(logprobs[i], targets[first + i], num) for i in range(logprobs.shape[0])]
            del logits
        if self.is_driver:
            output.prompt_logprobs[request.request_id] = (start + 1, entries)
