"""The step-level engine: add requests, step, get incremental outputs, abort.

The whole loop is three calls: `scheduler.schedule()`, `runner.execute()`, `scheduler.update()`;
the rest turns tokens into RequestOutputs. The Redis service drives this same object.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable

from engine.config import EngineConfig, SchedulerConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.scheduler import Scheduler
from engine.output_processor import RequestState, SequenceState
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus, child_request_id
from engine.sampling_params import SamplingParams
from engine.step_isolation import execute_isolating_faults, forget_uncomputed_blocks
from engine.tokenization import eos_token_ids, load_tokenizer
from engine.weights import load_model_config, resolve_model

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from engine.worker.model_runner import ModelRunner  # torch lives behind this import

        started = time.perf_counter()
        self.config = config
        self.source = source = resolve_model(config.model)
        self.model_config = load_model_config(source)
        self.scheduler_config = SchedulerConfig.resolve(config, model_context_length(self.model_config))
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(source, config.tokenizer)
        runner_args = (config, self.model_config, source, self.scheduler_config.max_model_len,
                       self.scheduler_config.max_num_batched_tokens)
        self.workers = None  # ranks 1..N-1 under tensor parallelism; this process is rank 0
        if config.tensor_parallel_size > 1:
            from engine.distributed.shard import check_tensor_parallel_size
            from engine.distributed.worker import TensorParallelWorkers

            check_tensor_parallel_size(self.model_config, config.tensor_parallel_size)
            self.workers = TensorParallelWorkers(config.tensor_parallel_size, runner_args)
            weakref.finalize(self, self.workers.shutdown)
        try:
            self.runner = ModelRunner(*runner_args)
        except BaseException:
            self.shutdown()
            raise
        self.kv_cache_manager = KVCacheManager(self.runner.num_blocks, config.block_size,
                                               config.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.kv_cache_manager)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.model_config)
        self.vocab_size = self.model_config.vocab_size
        self.requests: dict[str, RequestState] = {}
        self.sequences: dict[str, tuple[RequestState, SequenceState]] = {}
        self.failed_requests: dict[str, str] = {}  # dropped by a failed step, until take_failed_requests()
        logger.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens, in %.1fs", source.name,
                    self.runner.device, self.runner.dtype, self.runner.num_blocks, config.block_size,
                    time.perf_counter() - started)

    @property
    def max_model_len(self) -> int:
        return self.scheduler_config.max_model_len

    # -- requests -----------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None, *,
                    priority: int = 0, arrival_time: float | None = None, cache_salt: str | None = None,
                    tenant: str | None = None) -> None:
        """`tenant` names who asked: waiting requests are admitted fairly between tenants within a
        priority (None, the offline default, is one tenant)."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params or SamplingParams()
        prompt_text, prompt_ids = self._tokenize(prompt)
        self._validate_prompt(prompt_ids, params)
        params = params.clone()
        if self.tokenizer is None:
            params.detokenize = False
        params.all_stop_token_ids = set(self.eos_token_ids)
        n = params.n
        sequences = []
        for index in range(n):
            child_id = request_id if n == 1 else child_request_id(request_id, index)
            request = Request(child_id, prompt_ids, params, priority=priority, arrival_time=arrival_time,
                              cache_salt=cache_salt, parent_id=None if n == 1 else request_id, index=index,
                              tenant=tenant)
            sequences.append(SequenceState(request, self.tokenizer))
        state = RequestState(request_id, prompt_text, prompt_ids, params, sequences)
        self.requests[request_id] = state
        for sequence in sequences:
            self.sequences[sequence.request.request_id] = (state, sequence)
            self.scheduler.add_request(sequence.request)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Stop requests now; their KV blocks are free before the next step."""
        for request_id in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            state = self.requests.pop(request_id, None)
            if state is None:
                continue
            child_ids = [seq.request.request_id for seq in state.sequences]
            self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
            for child_id in child_ids:
                self.sequences.pop(child_id, None)
                self.runner.sampler.forget(child_id)

    def usage_so_far(self, request_id: str) -> tuple[int, int, int]:
        """(prompt tokens computed, completion tokens, cached tokens) of an unfinished request, so one
        stopped early (aborted, failed) is billed for the work done: the prompt counts as far as its
        KV was computed (all of it once a token was sampled), however often it was preempted."""
        state = self.requests.get(request_id)
        if state is None:
            return 0, 0, 0
        children = [sequence.request for sequence in state.sequences]
        num_prompt = len(state.prompt_token_ids)
        prompt = max(num_prompt if r.num_output_tokens else min(r.num_computed_tokens, num_prompt) for r in children)
        return prompt, sum(r.num_output_tokens for r in children), children[0].num_cached_tokens

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the loop -----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty():
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("no waiting request fits the KV cache; this is a bug (add_request checks it)")
            return []
        runner_output, culprits = execute_isolating_faults(self._execute, scheduler_output)
        self._fail(culprits)
        finished = {r.request_id for r in self.scheduler.update(scheduler_output, runner_output.sampled_token_ids)}

        touched: dict[str, RequestState] = {}
        for request, _ in scheduler_output.scheduled:
            state, sequence = self.sequences.get(request.request_id, (None, None))
            if state is None:
                continue
            if request.request_id in runner_output.prompt_logprobs:
                state.add_prompt_logprobs(*runner_output.prompt_logprobs[request.request_id],
                                         self.tokenizer if state.params.detokenize else None)
            token_id = runner_output.sampled_token_ids.get(request.request_id)
            is_finished = request.request_id in finished
            if token_id is None and not is_finished:
                continue  # a prefill chunk
            touched[state.request_id] = state
            stopped = token_id is not None and sequence.append(
                token_id, runner_output.logprobs.get(request.request_id), is_finished)
            if stopped and not is_finished:
                self.scheduler.finish_requests(request.request_id, RequestStatus.FINISHED_STOPPED)
                is_finished = True
            if is_finished:  # a stop string wins over a length cap reached on the same token
                sequence.finish(RequestStatus.FINISHED_STOPPED if stopped else request.status)
                self._forget_sequence(request.request_id)

        outputs, interval = [], self.config.stream_interval
        for state in touched.values():
            if interval > 1 and not state.stream_due(interval):
                continue  # its tokens wait for the next output (DELTA outputs carry all since the last)
            output = state.make_output()
            if output is not None:
                outputs.append(output)
            if state.finished:
                self.requests.pop(state.request_id, None)
        return outputs

    def take_failed_requests(self) -> dict[str, str]:
        """Requests a step dropped because running them raised (request id -> why), since the last call.
        They are aborted already; the caller tells their owners."""
        failed, self.failed_requests = self.failed_requests, {}
        return failed

    def _execute(self, scheduler_output):
        if self.workers is None:
            return self.runner.execute(scheduler_output)
        return self.workers.execute(self.runner, scheduler_output)

    def _fail(self, culprits) -> None:
        """Abort the requests (with all their `n` siblings) whose part of a step raised."""
        if not culprits:
            return
        for request, error in culprits:
            state, _ = self.sequences.get(request.request_id, (None, None))
            if state is None:
                continue
            forget_uncomputed_blocks(self.kv_cache_manager, request)
            self.failed_requests[state.request_id] = f"the engine failed while running the request ({error!r})"
            self.abort_request(state.request_id)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the engine is garbage collected)."""
        if self.workers is not None:
            self.workers.shutdown()

    def stats(self) -> dict:
        kv = self.kv_cache_manager
        return {
            "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions, "kv_cache_usage": kv.block_pool.get_usage(),
            "num_blocks": self.runner.num_blocks, "prefix_cache_queries": kv.prefix_cache_queries,
            "prefix_cache_hits": kv.prefix_cache_hits,
            "peak_kv_token_utilization": self.scheduler.peak_kv_token_utilization,
        }

    # -- helpers ------------------------------------------------------------------------------------

    def _forget_sequence(self, request_id: str) -> None:
        self.sequences.pop(request_id, None)
        self.runner.sampler.forget(request_id)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init is set): give token ids")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"prompt must be text, a list of token ids or a dict, got {type(prompt).__name__}")

    def _validate_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise ValueError(f"{name} must be at most the vocabulary size {self.vocab_size}, got {value}")
        if params.top_k > self.vocab_size:
            raise ValueError(f"top_k must be at most the vocabulary size {self.vocab_size}, got {params.top_k}")
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids in [0, {self.vocab_size})")
        if not prompt_ids:
            raise ValueError("prompt must not be empty")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(prompt_ids) > self.max_model_len:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens long, more than max_model_len="
                             f"{self.max_model_len}")
        # A request that cannot fit the whole KV cache on its own could never finish.
        max_tokens = self.max_model_len if params.max_tokens is None else params.max_tokens
        longest = min(len(prompt_ids) + max_tokens, self.max_model_len)
        capacity = (self.runner.num_blocks - 1) * self.config.block_size
        if longest > capacity:
            raise ValueError(f"prompt plus max_tokens needs {longest} tokens of KV cache, but it holds only "
                             f"{capacity}: lower max_tokens or max_model_len, or give the cache more memory")


def model_context_length(model_config) -> int:
    """The model's context length, capped by a sliding window we do not implement."""
    length = model_config.max_position_embeddings
    window = getattr(model_config, "sliding_window", None)
    if window and getattr(model_config, "use_sliding_window", True) and window < length:
        logger.warning("sliding window attention is not implemented: limiting the context to %d", window)
        length = window
    return length
