"""The step-level engine: add requests, step, get incremental outputs, abort.

A step reads schedule -> execute -> update -> process: `scheduler.schedule()` plans it (the step
contract), the runner(s) execute it, `scheduler.update()` takes in the sampled tokens, and the
output processor turns them into RequestOutputs. With async scheduling (on by default on CUDA)
execute is split: step N+1 is planned and launched while the device still runs step N, and step
N is then updated and processed. The Redis service drives this same object.
"""

from __future__ import annotations

import gc
import logging
import time
import weakref
from collections.abc import Iterable

from engine.config import EngineConfig, SchedulerConfig
from engine.core.kv_cache_groups import describe_kv_cache_groups
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import SchedulerOutput
from engine.errors import EngineDeadError
from engine.lora.config import LoRAConfig
from engine.lora.request import LoRARequest
from engine.output_processor import OutputProcessor, RequestState, SequenceState
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus, child_request_id
from engine.sampling_params import SamplingParams
from engine.spec_decode.config import SpeculativeConfig
from engine.step_isolation import execute_isolating_faults, forget_uncomputed_blocks
from engine.tokenization import eos_token_ids, load_tokenizer, token_id_limit
from engine.weights import load_model_config, resolve_model
from engine.weights.generation_defaults import load_sampling_defaults

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from engine.worker.model_runner import ModelRunner, resolve_device  # torch lives behind this import

        started = time.perf_counter()
        self.config = config = config.with_device_defaults(resolve_device(config.device).type == "cuda")
        self.source = source = resolve_model(config.model, config.revision)
        self.model_config = load_model_config(source)
        self.scheduler_config = SchedulerConfig.resolve(config, self.model_config.max_position_embeddings)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(source, config.tokenizer)
        self.sampling_defaults = load_sampling_defaults(source)  # for fields a caller leaves unset
        self.vocab_size = token_id_limit(source, self.model_config, self.tokenizer)
        runner_args = (config, self.model_config, source, self.scheduler_config.max_model_len,
                       self.scheduler_config.max_num_batched_tokens, self.vocab_size)
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
        windows = [group.sliding_window for group in self.runner.kv_cache_groups]
        drafter = self.runner.drafter  # a draft model reads group 0's blocks through its own layers
        if drafter is not None and any(layer.sliding_window != windows[0] for layer in drafter.attention_layers):
            windows[0] = None  # it may read what the target's window no longer needs
        self.kv_cache_manager = KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
                                               windows)
        self.speculative_config = SpeculativeConfig.from_dict(config.speculative_config)
        self.lora_config = LoRAConfig.from_engine_config(config)
        # Every adapter ever added, by lora_int_id: an id never names two adapters (it keys the prefix cache).
        self.lora_requests: dict[int, LoRARequest] = {}
        self.scheduler = Scheduler(self.scheduler_config, self.kv_cache_manager, self.speculative_config,
                                   self.lora_config and self.lora_config.max_loras)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.model_config)
        self.output_processor = OutputProcessor(self.tokenizer, config.stream_interval)
        # Speculation plans each step from the tokens the last one accepted: no step planned ahead.
        self.async_scheduling = config.async_scheduling and self.speculative_config is None
        self._in_flight: tuple[SchedulerOutput, object] | None = None  # launched, not yet fetched
        # Seconds the host waited for the device to finish a step planned ahead, since start: near zero
        # per step means the host, not the device, sets the pace (engine/service/stream_pacing.py).
        self.fetch_wait_s = 0.0
        self._structured_outputs = None  # StructuredOutputManager, made for the first grammar
        self.failed_requests: dict[str, str] = {}  # dropped by a failed step, until take_failed_requests()
        # The model, its CUDA graphs and the tokenizer are millions of objects that live as long as the
        # engine: frozen, the cyclic collector stops scanning them again and again while the many
        # small objects of each step (outputs, deltas) trigger collections; at 1,000 sequences a step
        # then costs half the host time (vLLM freezes its heap the same way).
        gc.collect()
        gc.freeze()
        logger.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens%s, async scheduling %s, in %.1fs",
                    source.name, self.runner.device, self.runner.dtype, self.runner.num_blocks, config.block_size,
                    describe_kv_cache_groups(self.runner.kv_cache_groups), "on" if self.async_scheduling else "off",
                    time.perf_counter() - started)

    @property
    def max_model_len(self) -> int:
        return self.scheduler_config.max_model_len

    # -- requests -----------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None, *,
                    priority: int = 0, arrival_time: float | None = None, cache_salt: str | None = None,
                    tenant: str | None = None, lora_request: LoRARequest | None = None) -> None:
        """`tenant` names who asked: waiting requests are admitted fairly between tenants within a
        priority (None, the offline default, is one tenant). `lora_request` runs it under that adapter;
        one the model cannot take raises LoRAAdapterError here, before anything runs."""
        if request_id in self.output_processor.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params or SamplingParams(**self.sampling_defaults)
        prompt_text, prompt_ids = self._tokenize(prompt)
        self._validate_prompt(prompt_ids, params)
        if lora_request is not None:
            self.add_lora(lora_request)
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
                              tenant=tenant, lora_request=lora_request)
            if params.structured_outputs is not None:
                request.grammar = self.structured_outputs.grammar_for(child_id, params.structured_outputs)
            sequences.append(SequenceState(request, self.tokenizer))
        self.output_processor.add(RequestState(request_id, prompt_text, prompt_ids, params, sequences))
        for sequence in sequences:
            self.scheduler.add_request(sequence.request)

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Check an adapter and load it into the host cache (vLLM's name); False if it was loaded.
        Raises ValueError without enable_lora, LoRAAdapterError for an adapter this model cannot take."""
        if self.lora_config is None:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r} requested, but the engine runs without "
                             "LoRA: start it with enable_lora=True (--enable-lora)")
        known = self.lora_requests.get(lora_request.lora_int_id)
        if known is not None and known != lora_request:
            raise ValueError(f"lora_int_id {lora_request.lora_int_id} is adapter {known.lora_name!r} at "
                             f"{known.lora_path!r}; give {lora_request.lora_name!r} an id of its own")
        loaded = self.runner.lora_manager.add_adapter(lora_request)
        self.lora_requests[lora_request.lora_int_id] = lora_request
        return loaded

    def remove_lora(self, lora_int_id: int) -> bool:
        """Drop an adapter no unfinished request uses from memory (vLLM's name)."""
        if any(r.lora_int_id == lora_int_id for r in self.scheduler.requests.values()):
            raise ValueError(f"LoRA adapter {lora_int_id} is in use by unfinished requests")
        return self.lora_config is not None and self.runner.lora_manager.remove_adapter(lora_int_id)

    def list_loras(self) -> set[int]:
        """The ids of the adapters in host memory."""
        return set(self.runner.lora_manager.list_adapters()) if self.lora_config is not None else set()

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Stop requests now; their KV blocks are free before the next step."""
        for request_id in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            state = self.output_processor.drop(request_id)
            if state is not None:
                child_ids = [seq.request.request_id for seq in state.sequences]
                self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)

    def usage_so_far(self, request_id: str) -> tuple[int, int, int]:
        """(prompt tokens computed, completion tokens, cached tokens) of an unfinished request, so one
        stopped early (aborted, failed) is billed for the work done: the prompt counts as far as its
        KV was computed (all of it once a token was sampled), however often it was preempted."""
        state = self.output_processor.requests.get(request_id)
        if state is None:
            return 0, 0, 0
        children = [sequence.request for sequence in state.sequences]
        num_prompt = len(state.prompt_token_ids)
        prompt = max(num_prompt if r.num_output_tokens else min(r.num_computed_tokens, num_prompt) for r in children)
        return prompt, sum(r.num_output_tokens for r in children), children[0].num_cached_tokens

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.requests)

    # -- the loop -----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self._structured_outputs is not None:
            self._fail_grammars()
        if not self.async_scheduling or self.scheduler.num_requests_reading_history:
            # Penalties read every token on the host: no step is planned ahead of the last.
            return self._complete_in_flight() + self._run_step(self.scheduler.schedule())
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty():
            return self._complete_in_flight() if self._in_flight else self._run_step(scheduler_output)
        try:
            launched = self._launch(scheduler_output)
        except EngineDeadError:
            raise
        except Exception:  # the step in flight ends first; then this one runs again in parts, alone
            return self._complete_in_flight() + self._run_step(scheduler_output)
        outputs = self._complete_in_flight(launched)
        self._in_flight = (scheduler_output, launched)
        return outputs

    def _run_step(self, scheduler_output: SchedulerOutput) -> list[RequestOutput]:
        """Run a step to the end, isolating the requests that make it fail (engine/step_isolation.py)."""
        if scheduler_output.is_empty():
            if self.scheduler.waiting and not self.scheduler.running:
                if self.scheduler.num_waiting_for_grammar():
                    time.sleep(0.001)  # only grammars compiling (in the background): do not spin
                    return []
                raise RuntimeError("no waiting request fits the KV cache; this is a bug (add_request checks it)")
            return []
        runner_output, culprits = execute_isolating_faults(self._execute, scheduler_output, self.scheduler.requests)
        return self._process(scheduler_output, runner_output, culprits)

    def _complete_in_flight(self, launched_next=None) -> list[RequestOutput]:
        """Fetch, update and process the step in flight. `launched_next`, the step launched behind
        it, samples its grammar rows once this one's tokens have advanced the matchers."""
        if self._in_flight is None:
            self._sample_constrained(launched_next)
            return []
        scheduler_output, launched = self._in_flight
        self._in_flight = None
        started = time.perf_counter()
        runner_output = self._fetch(launched)
        self.fetch_wait_s += time.perf_counter() - started
        return self._process(scheduler_output, runner_output, [], launched_next)

    def _process(self, scheduler_output: SchedulerOutput, runner_output, culprits,
                 launched_next=None) -> list[RequestOutput]:
        self._fail(scheduler_output, culprits)
        finished = {r.request_id for r in self.scheduler.update(scheduler_output, runner_output.sampled_token_ids,
                                                                 runner_output.spec_token_ids,
                                                                 runner_output.draft_token_ids)}
        self._sample_constrained(launched_next)  # before the output work: the device waits for it
        processed = self.output_processor.process(scheduler_output.num_scheduled_tokens, runner_output, finished)
        self.scheduler.finish_requests(processed.stopped_req_ids, RequestStatus.FINISHED_STOPPED)
        return processed.outputs

    def take_failed_requests(self) -> dict[str, str]:
        """Requests a step dropped because running them raised (request id -> why), since the last call.
        They are aborted already; the caller tells their owners."""
        failed, self.failed_requests = self.failed_requests, {}
        return failed

    def _execute(self, scheduler_output):
        launched = self._launch(scheduler_output)
        self._sample_constrained(launched)
        return self._fetch(launched)

    def _sample_constrained(self, launched) -> None:
        """Fill the grammar masks of a launched step that awaits them and let rank 0 sample it.
        Every token before this step's is in the matchers by now."""
        if launched is None or not launched.awaits_bitmask:
            return
        requests = self.scheduler.requests
        rows = [(row, requests[request_id].grammar) for row, request_id in launched.constrained_request_ids()
                if request_id in requests]  # one finished meanwhile samples unconstrained; its token is dropped
        bitmask = self.structured_outputs.bitmask(rows)
        if self.workers is None:
            self.runner.sample_constrained(launched, bitmask)
        else:
            self.workers.sample_constrained(self.runner, launched, bitmask)

    def _fail_grammars(self) -> None:
        """Abort the requests whose grammar could not be built (the web side validates first)."""
        for child_id, why in self._structured_outputs.take_failed():
            state, _ = self.output_processor.sequences.get(child_id, (None, None))
            if state is not None and state.request_id not in self.failed_requests:
                self.failed_requests[state.request_id] = why
                self.abort_request(state.request_id)

    def _launch(self, scheduler_output):
        if self.workers is None:
            return self.runner.launch(scheduler_output)
        return self.workers.launch(self.runner, scheduler_output)

    def _fetch(self, launched):
        if self.workers is None:
            return self.runner.fetch(launched)
        return self.workers.fetch(self.runner, launched)

    def _fail(self, scheduler_output: SchedulerOutput, culprits) -> None:
        """Abort the requests (with all their `n` siblings) whose part of a step raised."""
        for request_id, error in culprits:
            request = self.scheduler.requests.get(request_id)
            state, _ = self.output_processor.sequences.get(request_id, (None, None))
            if request is None or state is None:
                continue
            computed = request.num_computed_tokens - scheduler_output.num_scheduled_tokens[request_id]
            forget_uncomputed_blocks(self.kv_cache_manager, request, computed)
            self.failed_requests[state.request_id] = f"the engine failed while running the request ({error!r})"
            self.abort_request(state.request_id)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the engine is garbage collected), and
        hand the heap frozen at start back to the collector: frozen objects are never scanned again, so
        a reference cycle through the engine's objects would keep its model and KV cache alive after
        the last reference went (a second engine in the same process then found no memory left). This
        unfreezes every engine's objects in the process; another engine still running only pays the
        collector's scans again."""
        gc.unfreeze()
        if self.workers is not None:
            self.workers.shutdown()
        grammars = getattr(self, "_structured_outputs", None)  # unset when the model failed to load
        if grammars is not None:
            grammars.shutdown()

    def stats(self) -> dict:
        kv = self.kv_cache_manager
        return {
            "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions, "kv_cache_usage": kv.block_pool.get_usage(),
            "num_blocks": self.runner.num_blocks, "prefix_cache_queries": kv.prefix_cache_queries,
            "prefix_cache_hits": kv.prefix_cache_hits,
            "peak_kv_token_utilization": self.scheduler.peak_kv_token_utilization,
            "peak_num_running": self.scheduler.peak_num_running,
            **self.speculation_stats(),
        }

    def speculation_stats(self) -> dict:
        """Proposed and accepted tokens so far, the acceptance rate and the mean tokens a speculating
        step produced (accepted proposals plus the sample after them); {} without speculation."""
        scheduler = self.scheduler
        if self.speculative_config is None:
            return {}
        steps, drafts, accepted = scheduler.num_spec_steps, scheduler.num_draft_tokens, scheduler.num_accepted_tokens
        return {"spec_num_draft_tokens": drafts, "spec_num_accepted_tokens": accepted,
                "spec_acceptance_rate": accepted / drafts if drafts else 0.0,
                "spec_mean_accepted_length": (accepted + steps) / steps if steps else 0.0}

    # -- helpers ------------------------------------------------------------------------------------

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

    @property
    def structured_outputs(self):
        if self._structured_outputs is None:
            from engine.structured_outputs.manager import StructuredOutputManager

            # Bitmasks as wide as the logits (the model's vocabulary, also where the tokenizer's is smaller).
            self._structured_outputs = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size,
                                                               self.eos_token_ids)
        return self._structured_outputs

    def _validate_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if params.structured_outputs is not None:
            from engine.structured_outputs.grammar import validate

            validate(params.structured_outputs)  # the matcher itself is built in the background
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
        # A request that cannot fit the whole KV cache on its own could never finish (with a draft
        # model's proposals after its last token).
        max_tokens = self.max_model_len if params.max_tokens is None else params.max_tokens
        spec = self.speculative_config
        lookahead = spec.num_speculative_tokens if spec is not None and spec.uses_draft_model else 0
        longest = min(len(prompt_ids) + max_tokens + lookahead, self.max_model_len)
        # Sliding-window groups give back the blocks behind the window as it moves.
        held = self.kv_cache_manager.max_blocks_held(longest, self.scheduler_config.max_num_batched_tokens + lookahead)
        capacity = (self.runner.num_blocks - 1) * self.config.block_size
        if held > self.runner.num_blocks - 1:
            needed = min(longest, held * self.config.block_size)
            raise ValueError(f"prompt plus max_tokens needs {needed} tokens of KV cache, but it holds only "
                             f"{capacity}: lower max_tokens or max_model_len, or give the cache more memory")
