"""One API call from validated input to settled usage: the business logic behind the views.

`start_completion` / `start_chat` check the model, refuse a tenant at its rate limits, check what
needs no tokenizing (characters, token ids against the vocabulary), tokenize off the event loop,
check the key's caps, admit the call (rate limits and quota, atomically in Redis) and return a
`Call` (a call refused after authentication counts against requests per minute all the same);
the view then streams or collects it and always `close()`s it, which settles the quota to the
real token count and records usage, whether the call finished, failed, or the client went away.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager

from django.conf import settings
from redis.exceptions import RedisError
from rest_framework.exceptions import APIException

from engine import tracing
from engine.service.client import EngineUnavailable
from engine.service.protocol import Usage
from inference import metrics
from inference.call_registry import register_call
from inference.engine_client import get_engine_client
from inference.errors import OpenAIError, invalid
from inference.formats import ChatFormat, CompletionFormat, _Format
from inference.generation import EngineFailed, GenerationPlan, generate, total_usage
from inference.model_targets import ModelTarget, resolve_model
from inference.prompt_limits import chat_chars, check_text_length, check_token_ids
from inference.prompt_tokenizer import PromptError, PromptTokenizer
from inference.request_cleanup import close_when_request_ends
from inference.sampling import sampling_fields
from inference.stream_text import web_detokenizes
from inference.structured_outputs import checked_constraint, requested_constraint
from inference.tokenizing import off_loop
from inference.tools import ToolPlan
from tenants.admission import AdmissionRefused, admit
from tenants.models import ApiKey
from tenants.request_gate import count_refused, refuse_early
from tenants.selectors import effective_limits
from tenants.services import usage_event
from tenants.usage_buffer import buffer_usage, ensure_usage_flusher

logger = logging.getLogger(__name__)

ENGINE_ERRORS = {  # engine error code -> (HTTP status, OpenAI error type)
    "invalid_request": (400, "invalid_request_error"),
    "engine_unavailable": (503, "server_error"),
    "deadline_exceeded": (504, "server_error"),
    "lora_not_found": (503, "server_error"),  # an adapter registered moments ago, not loaded yet (or failed to)
}


class Call:
    def __init__(self, *, api_key: ApiKey, endpoint: str, plan: GenerationPlan, fmt: _Format, admission,
                 user: str = "") -> None:
        self.api_key, self.endpoint, self.plan, self.format, self.admission = api_key, endpoint, plan, fmt, admission
        self.user = user  # OpenAI's end-user id, kept on the usage event (abuse tracing, per-user billing)
        self.usages: dict[int, Usage] = {}
        self.engine_timings: dict[int, dict] = {}  # per prompt: its final delta's queue/prefill/decode times
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.status, self.error_code = "cancelled", ""  # until the engine says it finished
        self.closed = False

    @property
    def headers(self) -> dict[str, str]:
        return self.admission.headers

    async def chunks(self) -> AsyncIterator[dict]:
        """Stream chunks, then the usage chunk if asked; an engine failure raises OpenAIError."""
        async for prompt_index, delta in self._deltas():
            for chunk in self.format.on_delta(prompt_index, delta):
                yield chunk
        if self.format.include_usage:
            yield self.format.chunk([], self.usage, final_usage=True)

    async def collect(self) -> dict:
        async for prompt_index, delta in self._deltas():
            self.format.on_delta(prompt_index, delta)
        return self.format.body(self.usage)

    @property
    def usage(self) -> Usage:
        return total_usage(self.usages)

    async def _deltas(self):
        try:
            async for prompt_index, delta in generate(get_engine_client(), self.plan, self.usages):
                if delta.outputs and self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                self.usages[prompt_index] = delta.usage
                if delta.timings:
                    self.engine_timings[prompt_index] = delta.timings
                yield prompt_index, delta
        except EngineUnavailable as error:
            self.status, self.error_code = "error", "engine_unavailable"
            raise OpenAIError(str(error), status=503, type="server_error", code="engine_unavailable") from None
        except EngineFailed as error:
            self.status, self.error_code = "error", error.code
            status, kind = ENGINE_ERRORS.get(error.code, (503, "server_error"))
            raise OpenAIError(str(error), status=status, type=kind, code=error.code) from None
        self.status = "ok"

    async def close(self) -> None:
        """Settle the quota and record usage exactly once, even while being cancelled."""
        if self.closed:
            return
        self.closed = True
        await asyncio.shield(self._settle())

    async def _settle(self) -> None:
        usage, now = self.usage, time.monotonic()
        await self.admission.settle(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        metrics.observe_call(endpoint=self.endpoint, tenant=self.api_key.tenant.name, status=self.status,
                             usage=usage, ttft_s=ttft, duration_s=now - self.started,
                             engine_timings=list(self.engine_timings.values()))
        event = usage_event(
            api_key=self.api_key, request_id=self.plan.request_id, model=self.plan.model, endpoint=self.endpoint,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens, status=self.status, error_code=self.error_code,
            latency_ms=int((now - self.started) * 1000), ttft_ms=None if ttft is None else int(ttft * 1000),
            user=self.user)
        ensure_usage_flusher()
        await buffer_usage(redis=get_engine_client().redis, key_prefix=settings.ENGINE_KEY_PREFIX, event=event)


async def start_completion(*, api_key: ApiKey, data: dict, priority_offset: int = 0) -> Call:
    async with refusal_counted(api_key):
        await _refuse_early(api_key, "completions")  # before any work: at its limits, a tenant costs no more
        target = await resolve_model(api_key=api_key, model=data["model"])
        tokenizer = target.tokenizer
        limits = effective_limits(api_key=api_key)
        for prompt in data["prompt"]:
            if isinstance(prompt, str):
                check_text_length(tokenizer, limits, len(prompt), "prompt")
        check_token_ids(tokenizer, limits, data["prompt"], data)
        with _prompt_errors("prompt"):
            prompts, texts, token_texts = await off_loop(_encode_completion, tokenizer, data["prompt"], data["echo"])
        max_tokens = _max_tokens(api_key, tokenizer, prompts, data.get("max_tokens"), default=16)
        logprobs = data.get("logprobs")
        prompt_logprobs = logprobs if data["echo"] else None
        if max_tokens == 0:  # echo only (the serializer checks): the engine scores the prompt, samples nothing
            prompt_logprobs = logprobs or 0
        fields = sampling_fields(data, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                 model_defaults=tokenizer.card.sampling_defaults,
                                 tenant_defaults=limits.sampling_defaults)
        await _constrain(fields, requested_constraint(data))
        plan = _plan(api_key, target, "cmpl", prompts, fields, texts)
        plan.priority += priority_offset  # batch jobs run behind interactive calls
        fmt = CompletionFormat(plan, echo=data["echo"], logprobs=logprobs, prompt_token_texts=token_texts,
                               include_usage=_include_usage(data))
        return await _admit(api_key, "completions", plan, fmt, user=data.get("user") or "")


async def start_chat(*, api_key: ApiKey, data: dict, priority_offset: int = 0) -> Call:
    async with refusal_counted(api_key):
        await _refuse_early(api_key, "chat.completions")
        target = await resolve_model(api_key=api_key, model=data["model"])
        tokenizer = target.tokenizer
        limits = effective_limits(api_key=api_key)
        messages = [dict(m) for m in data["messages"]]
        tools = ToolPlan.of(data, tokenizer.card.chat_template)
        check_text_length(tokenizer, limits, chat_chars(messages, tools.tools), "messages")
        check_token_ids(tokenizer, limits, [], data)
        rendered, template_tools = tools.template_inputs(messages, tokenizer.card.chat_template)
        with _prompt_errors("messages"):
            prompts = [await off_loop(tokenizer.encode_chat, rendered, True, template_tools)]
        requested = data.get("max_completion_tokens") or data.get("max_tokens")
        max_tokens = _max_tokens(api_key, tokenizer, prompts, requested, default=None)
        top = (data.get("top_logprobs") or 0) if data.get("logprobs") else None
        fields = sampling_fields(data, max_tokens=max_tokens, logprobs=top,
                                 model_defaults=tokenizer.card.sampling_defaults,
                                 tenant_defaults=limits.sampling_defaults)
        asked = requested_constraint(data)
        forced = tools.constraint()
        if forced is not None and asked is not None:
            raise invalid(asked[0], f"tool_choice {tools.choice!r} already constrains the output; drop {asked[0]}.")
        await _constrain(fields, ("tools", forced.as_dict()) if forced is not None else asked)
        plan = _plan(api_key, target, "chatcmpl", prompts, fields, [])
        plan.priority += priority_offset
        return await _admit(api_key, "chat.completions", plan,
                            ChatFormat(plan, top_logprobs=top, include_usage=_include_usage(data), tools=tools),
                            user=data.get("user") or "")


async def _constrain(fields: dict, asked: tuple[str, dict] | None) -> None:
    """Add the call's checked output constraint to its sampling fields (the check compiles: off the loop)."""
    if asked is not None:
        fields["structured_outputs"] = (await off_loop(checked_constraint, *asked)).as_dict()


def _encode_completion(tokenizer: PromptTokenizer, prompts: list, echo: bool):
    """Token ids of each prompt and, for echo, its text and each token's text (in the tokenizer pool)."""
    ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    texts = [p if isinstance(p, str) else _decode(tokenizer, p) for p in prompts] if echo else []
    token_texts = [[_decode(tokenizer, [t]) for t in p] for p in ids] if echo else []
    return ids, texts, token_texts


async def _refuse_early(api_key: ApiKey, endpoint: str) -> None:
    try:
        await refuse_early(redis=get_engine_client().redis, api_key=api_key, key_prefix=settings.ENGINE_KEY_PREFIX)
    except AdmissionRefused as refused:
        raise _refusal_error(api_key, endpoint, refused) from None


@asynccontextmanager
async def refusal_counted(api_key: ApiKey):
    """A call refused after authentication counts against requests per minute, whatever refused it
    (bad JSON, validation, caps, quota), so a tenant cannot make the server work for free; except
    the rate limiter's own 429s, which cost nothing (refused before any work) and, counted, would
    lock out a client that retries. Once per call, however many of these it passes through."""
    try:
        yield
    except (OpenAIError, APIException) as error:
        limited = isinstance(error, OpenAIError) and error.code == "rate_limit_exceeded"
        if not limited and not getattr(error, "refusal_counted", False):
            error.refusal_counted = True
            try:
                await count_refused(redis=get_engine_client().redis, api_key=api_key,
                                    request_id=f"refused-{uuid.uuid4().hex}", key_prefix=settings.ENGINE_KEY_PREFIX)
            except RedisError:  # the refusal itself is the answer; Redis trouble shows on the next call
                logger.warning("could not count a refused call of API key %s", api_key.prefix)
        raise


def _refusal_error(api_key: ApiKey, endpoint: str, refused: AdmissionRefused) -> OpenAIError:
    metrics.observe_refusal(endpoint=endpoint, tenant=api_key.tenant.name, code=refused.code)
    return OpenAIError(refused.message, status=refused.status, type=refused.type, code=refused.code,
                       headers=refused.headers)


@contextmanager
def _prompt_errors(param: str):
    try:
        yield
    except PromptError as error:
        raise OpenAIError(str(error), param=param) from None


def _decode(tokenizer: PromptTokenizer, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids) if tokenizer.tokenizer is not None else ""


def _max_tokens(api_key: ApiKey, tokenizer: PromptTokenizer, prompts: list[list[int]], requested: int | None,
                default: int | None) -> int:
    """The request's max_tokens within the key's caps and the model's context (OpenAI's messages)."""
    limits = effective_limits(api_key=api_key)
    context = tokenizer.card.max_model_len
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise OpenAIError("The prompt is empty.", param="prompt", code="empty_prompt")
    if longest > limits.max_prompt_tokens:
        raise OpenAIError(f"The prompt has {longest} tokens; this API key allows at most {limits.max_prompt_tokens}.",
                          param="prompt", code="prompt_too_long")
    if requested is not None and requested > limits.max_tokens_cap:
        raise OpenAIError(f"max_tokens is {requested}; this API key allows at most {limits.max_tokens_cap}.",
                          param="max_tokens", code="max_tokens_exceeded")
    max_tokens = requested if requested is not None else min(default or limits.max_tokens_cap,
                                                             limits.max_tokens_cap, max(context - longest, 1))
    if context and longest + max_tokens > context:
        raise OpenAIError(f"This model's maximum context length is {context} tokens. However, you requested "
                          f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in the completion). "
                          "Please reduce the prompt or the completion length.", param="max_tokens",
                          code="context_length_exceeded")
    return max_tokens


def _plan(api_key: ApiKey, target: ModelTarget, kind: str, prompts, fields: dict, texts: list[str]) -> GenerationPlan:
    limits = effective_limits(api_key=api_key)
    _check_sequences(limits, n=fields.get("n", 1), prompts=len(prompts))
    # The trace context is taken here, in the view's span: a stream's body runs after that span ends.
    web_tokenizer = target.tokenizer.tokenizer
    if web_detokenizes(target.tokenizer.card, web_tokenizer, fields):
        fields["detokenize"] = False  # the engine sends token ids; this process makes the text
    else:
        web_tokenizer = None
    return GenerationPlan(request_id=f"{kind}-{uuid.uuid4().hex}", model=target.model, tenant=str(api_key.tenant_id),
                          prompts=prompts, params=fields, priority=limits.priority_tier, prompt_texts=texts,
                          trace_context=tracing.current_context(), base_model=target.base_model,
                          lora_name=target.lora_name, web_tokenizer=web_tokenizer)


def _check_sequences(limits, *, n: int, prompts: int) -> None:
    """n x prompts is what one call queues in the engine: bounded per call (a 400: asking again never
    helps, including when it is over the tenant's whole in-flight limit) before it is admitted."""
    cap = min(limits.max_sequences_per_request, limits.max_sequences_in_flight)
    if n * prompts > cap:
        raise OpenAIError(f"This request asks for {n * prompts} sequences (n={n} x {prompts} prompts); this API key "
                          f"allows at most {cap} per request. Lower n or send fewer prompts per request.",
                          param="n", code="too_many_sequences")


def _include_usage(data: dict) -> bool:
    return bool(data.get("stream") and (data.get("stream_options") or {}).get("include_usage"))


async def _admit(api_key: ApiKey, endpoint: str, plan: GenerationPlan, fmt: _Format, user: str = "") -> Call:
    prompt_tokens = sum(len(p) for p in plan.prompts)
    # Recorded before it is admitted: a process killed at any moment leaves its holds on record.
    forget = await register_call(get_engine_client(), request_id=plan.request_id, api_key_id=api_key.pk)
    try:
        with tracing.span("llm.admission", **{"llm.request_id": plan.request_id, "llm.prompt_tokens": prompt_tokens}):
            admission = await admit(redis=get_engine_client().redis, api_key=api_key, request_id=plan.request_id,
                                    prompt_tokens=prompt_tokens, key_prefix=settings.ENGINE_KEY_PREFIX,
                                    max_tokens=plan.params["max_tokens"] * plan.n * len(plan.prompts),
                                    sequences=plan.n * len(plan.prompts))
    except AdmissionRefused as refused:
        await forget()
        metrics.observe_refusal(endpoint=endpoint, tenant=api_key.tenant.name, code=refused.code)
        raise OpenAIError(refused.message, status=refused.status, type=refused.type, code=refused.code,
                          headers=refused.headers) from None
    admission.on_settle = forget
    call = Call(api_key=api_key, endpoint=endpoint, plan=plan, fmt=fmt, admission=admission, user=user)
    close_when_request_ends(call.close)  # in case the client leaves before the response starts
    return call
