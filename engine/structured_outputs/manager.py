"""The engine's side of structured outputs: compile grammars off the step loop, keep one matcher per
request, and fill each step's token bitmask.

llguidance rather than xgrammar (measured on the bundled tokenizer, benchmarks/RESULTS.md): it
needs neither torch nor a tokenizer to validate, so the web side refuses a bad schema with the very
code the engine compiles with; building a matcher drops the GIL, so compiling in a thread pool
really is off the loop; it has no ahead-of-time compile (a new schema is ready in milliseconds);
and its executor fills a whole batch's masks on several threads. xgrammar's masks are faster per
row (5 us against 25 us), which the parallel fill and async scheduling hide: the mask for step N+1
is filled while the device runs step N+1's forward (see LLMEngine.step).

A request waits in the queue until its matcher is built; one whose grammar fails is reported by
`take_failed()` and aborted with the reason. Equal constraints share a compiled template, which
each request copies (`deep_copy`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engine.structured_outputs.grammar import to_grammar
from engine.structured_outputs.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

MAX_TEMPLATES = 256  # compiled grammars kept for reuse, least recently used dropped first


class RequestGrammar:
    """One request's matcher: built in the background, then advanced by each sampled token."""

    __slots__ = ("future", "matcher")

    def __init__(self, future: Future) -> None:
        self.future = future
        self.matcher = None

    def is_ready(self) -> bool:
        """Built without error (a failed one is never ready: the engine aborts its request)."""
        if self.matcher is None and self.future.done() and self.future.exception() is None:
            self.matcher = self.future.result()
        return self.matcher is not None

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar refuses it (the matcher is then in error)."""
        return self.matcher.consume_token(token_id)

    def is_finished(self) -> bool:
        """No token can follow (the grammar is complete, or refused a token): the request stops."""
        return self.matcher.is_stopped() or self.matcher.is_error()


@dataclass
class GrammarBitmask:
    """The allowed tokens of some rows of a step's sampling batch (host memory, int32 words)."""

    rows: list[int]
    words: torch.Tensor  # [len(rows), ceil(vocab / 32)]


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int], max_workers: int = 4) -> None:
        if tokenizer is None or not hasattr(tokenizer, "backend_tokenizer"):
            raise ValueError("structured outputs need the model's fast (Hugging Face tokenizers) tokenizer")
        # Masks cover the model's rows and the tokenizer's ids, whichever is more (llguidance needs the
        # latter; logits are only as wide as the former).
        self.vocab_size = max(vocab_size, len(tokenizer))
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar")
        # The token trie takes ~0.4 s to build: once, in the pool, before the first grammar.
        # A model whose stop ids lie past its tokenizer's (a dummy preset borrowing a smaller tokenizer)
        # ends constrained output when the grammar completes; llguidance refuses ids it cannot decode.
        eos_in_tokenizer = sorted(i for i in eos_token_ids if i < len(tokenizer))
        self._tokenizer = self._pool.submit(_llg_tokenizer, tokenizer, self.vocab_size, eos_in_tokenizer)
        self._templates: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._failed: list[tuple[str, str]] = []  # (request id, why), filled from pool threads
        self._executor = None  # llguidance's parallel mask filler, made on first use
        self._pin = torch.cuda.is_available()  # pinned host memory: the copy to the device does not wait

    def grammar_for(self, request_id: str, params: StructuredOutputsParams) -> RequestGrammar:
        """Start building the request's matcher; it is ready when `is_ready()` says so."""
        key = params.key()
        with self._lock:
            template = self._templates.get(key)
            if template is None or (template.done() and template.exception() is not None):
                template = self._templates[key] = self._pool.submit(self._compile, params)
                while len(self._templates) > MAX_TEMPLATES:
                    self._templates.popitem(last=False)
            else:
                self._templates.move_to_end(key)
        future: Future = Future()
        template.add_done_callback(lambda done: self._copy_for(request_id, done, future))
        return RequestGrammar(future)

    def take_failed(self) -> list[tuple[str, str]]:
        """Requests whose grammar failed to build since the last call: (request id, why)."""
        with self._lock:
            failed, self._failed = self._failed, []
        return failed

    def bitmask(self, rows: list[tuple[int, RequestGrammar]]) -> GrammarBitmask | None:
        """The masks of the given (batch row, grammar) pairs, from each matcher's current state.
        Finished matchers are left out: their row's token is dropped anyway."""
        live = [(row, grammar.matcher) for row, grammar in rows if not grammar.is_finished()]
        if not live:
            return None
        import llguidance  # (not llguidance.torch: importing it compiles a kernel with torch.compile, seconds)

        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        num_words = -(-self.vocab_size // 32)
        words = torch.empty((len(live), num_words), dtype=torch.int32, pin_memory=self._pin)
        self._executor.unsafe_compute_mask_ptr([(m, k) for k, (_, m) in enumerate(live)], words.data_ptr(),
                                               num_words * 4, len(live))
        return GrammarBitmask([row for row, _ in live], words)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, params: StructuredOutputsParams):
        import llguidance

        matcher = llguidance.LLMatcher(self._tokenizer.result(), to_grammar(params), log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{params.kind} cannot be compiled: {matcher.get_error()}")
        return matcher

    def _copy_for(self, request_id: str, template: Future, future: Future) -> None:
        error = template.exception()
        if error is None:
            future.set_result(template.result().deep_copy())
            return
        future.set_exception(error)
        with self._lock:
            self._failed.append((request_id, str(error)))


def _llg_tokenizer(tokenizer, vocab_size: int, eos_token_ids: list[int]):
    """llguidance's view of a Hugging Face fast tokenizer, as llguidance.hf builds it."""
    import copy

    import llguidance

    backend = copy.copy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    return llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos_token_ids or None)
