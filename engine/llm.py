"""The offline API, as vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

from engine.config import BUNDLED_MODEL, EngineConfig
from engine.llm_engine import LLMEngine, PromptType
from engine.lora.request import LoRARequest
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.special_token_guard import SpecialTokenGuard


class LLM:
    """Runs batches of prompts to completion with continuous batching.

    With no `model`, the bundled SmolLM2-135M-Instruct is used. Options carry vLLM's names
    (`dtype`, `max_model_len`, `max_num_seqs`, `enable_prefix_caching`, ...; see EngineConfig).
    With `tensor_parallel_size=N` the model is split over N processes (started with multiprocessing's
    "spawn", so a script that builds one needs the usual `if __name__ == "__main__":` guard).
    """

    def __init__(self, model: str = BUNDLED_MODEL, **kwargs) -> None:
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> None:
        """Forget every cached block no request holds (e.g. after changing what prompts mean)."""
        self.llm_engine.kv_cache_manager.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """The model's own defaults (its generation_config.json) over SamplingParams' (vLLM's name)."""
        return SamplingParams(**self.llm_engine.sampling_defaults)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts. `lora_request` is
        one adapter for all prompts, or a list with one (or None) per prompt."""
        prompts = _as_prompt_list(prompts)
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        if isinstance(lora_request, Sequence):
            if len(lora_request) != len(prompts):
                raise ValueError(f"got {len(lora_request)} lora_requests for {len(prompts)} prompts")
            lora_list = list(lora_request)
        else:
            lora_list = [lora_request] * len(prompts)

        request_ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                request_id = str(next(self._counter))
                self.llm_engine.add_request(request_id, prompt, params.clone(output_kind=RequestOutputKind.FINAL_ONLY),
                                            priority=priority[i] if priority else 0, lora_request=lora_list[i])
                request_ids.append(request_id)
            return self._run_engine(request_ids, use_tqdm)
        except BaseException:
            self.llm_engine.abort_request(request_ids)
            raise

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them, then generate.
        Special-token strings typed into a message are text, as on the API (engine.special_token_guard)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        guard = SpecialTokenGuard(tokenizer.backend_tokenizer)  # content never makes a control token

        def render(conversation: list[dict], tools: list[dict] | None) -> str:
            return tokenizer.apply_chat_template(conversation, tools=tools, chat_template=chat_template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)

        prompts = [{"prompt_token_ids": guard.encode_chat(c, render)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        started, output_tokens = time.perf_counter(), 0
        try:
            while self.llm_engine.has_unfinished_requests():
                for output in self.llm_engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        output_tokens += sum(len(o.token_ids) for o in output.outputs)
                        bar.update(1)
                        bar.set_postfix_str(f"output {output_tokens / (time.perf_counter() - started):.1f} tok/s")
        finally:
            bar.close()
        failed = self.llm_engine.take_failed_requests()  # the other requests ran to the end
        if failed:
            raise RuntimeError(f"{len(failed)} request(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        return [finished[request_id] for request_id in request_ids]


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts
