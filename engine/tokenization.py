"""Tokenizer loading (Hugging Face folders and GGUF files) and incremental detokenization."""

from __future__ import annotations

import hashlib
import os
import weakref
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from engine.weights.source import ModelSource, bundled_model_path, resolve_model


def _cache_dir() -> Path:
    return Path(os.environ.get("ENGINE_CACHE_DIR", Path.home() / ".cache" / "llm-serve"))


def load_tokenizer(source: ModelSource, tokenizer: str | None = None):
    """The tokenizer named by `tokenizer`, else the model's own; dummy models borrow SmolLM2's."""
    if tokenizer is not None and tokenizer != source.name:
        source = resolve_model(tokenizer)
    if source.kind == "dummy":
        source = ModelSource("gguf", path=bundled_model_path())
    from transformers import AutoTokenizer

    if source.kind == "hf":
        return AutoTokenizer.from_pretrained(str(source.path), trust_remote_code=False)
    return _gguf_tokenizer(source.path)


def _gguf_tokenizer(path: Path):
    """Building a fast tokenizer from GGUF metadata takes seconds, so the result is cached on disk."""
    from transformers import AutoTokenizer

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = _cache_dir() / "tokenizers" / key
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        tok.save_pretrained(str(cached))
    except OSError:
        pass  # a read-only home only costs the conversion time next start
    return tok


def token_id_limit(source: ModelSource, model_config, tokenizer) -> int:
    """The token ids the engine takes and samples: the model's vocabulary, except for a dummy model
    whose borrowed tokenizer is smaller (SmolLM2's 49,152 ids under Gemma's 256k), where it stops at
    the tokenizer's: beyond it an id has no text (it would decode to nothing). The model runner masks
    the logits of the ids beyond (as vLLM masks a padded vocabulary), so the LM head and the sampler
    still do the whole vocabulary's work and throughput stays that of the real model; refusing such
    ids when detokenizing instead would fail nearly every request of a random-weight model."""
    vocab_size = model_config.vocab_size
    if source.kind == "dummy" and tokenizer is not None:
        return min(vocab_size, len(tokenizer))
    return vocab_size


def eos_token_ids(tokenizer, model_config) -> set[int]:
    ids = set()
    for value in (getattr(model_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return ids


# Text that transformers' clean_up_tokenization changes (" ." -> ".", " 's" -> "'s", ...).
_CLEANUP_PROBE = "a . b , c ! d ? e 's f n't g 'm h 've i 're"
_decodes_like_backend: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decodes_like_its_backend(tokenizer) -> bool:
    """Whether transformers' decode() returns its Rust backend's text: then a stream can run on the
    backend's DecodeStream (about a microsecond a token) and still match decode(). decode() may also
    clean up spaces before punctuation (`clean_up_tokenization_spaces`), which the backend does not;
    transformers 5 ignores that setting for BPE tokenizers, and Llama 3's sets it, so the setting alone
    would send every Llama 3 stream down the ~5x slower window path. Checked once per tokenizer, on a
    probe whose text the clean-up would change."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return True
    try:
        return _decodes_like_backend[tokenizer]
    except KeyError:
        pass
    except TypeError:  # a tokenizer that cannot be a weak key: probed every time
        return _probe(tokenizer)
    known = _decodes_like_backend[tokenizer] = _probe(tokenizer)
    return known


def _probe(tokenizer) -> bool:
    ids = tokenizer.backend_tokenizer.encode(_CLEANUP_PROBE, add_special_tokens=False).ids
    return tokenizer.decode(ids) == tokenizer.backend_tokenizer.decode(ids)


def token_text(tokenizer, token_id: int) -> str:
    """`tokenizer.decode([token_id])`, a logprob's decoded token: through the Rust backend when its
    text is decode()'s (~0.6 us against ~2.2; a top-20 logprobs request decodes 21 a token)."""
    backend = streaming_backend(tokenizer)
    if backend is not None:
        return backend.decode([token_id], skip_special_tokens=False)
    return tokenizer.decode([token_id])


def streaming_backend(tokenizer) -> Tokenizer | None:
    """The Rust tokenizer whose decoding is `tokenizer`'s text, or None (no backend, or a decode() that
    cleans up on top). A bare `tokenizers.Tokenizer` (a web process's, from the ModelCard) is its own."""
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    return backend if backend is not None and decodes_like_its_backend(tokenizer) else None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without ever emitting half a character.

    With a fast (Rust) tokenizer it runs `tokenizers`' DecodeStream, about a microsecond a token,
    primed with the prompt's last tokens so the first word keeps its leading space; a whole step at
    batch 256 then costs well under a millisecond. Otherwise it decodes a short window (a few tokens
    of context plus the unread ones), as vLLM does: a delta is released once the window's text no
    longer ends in an incomplete UTF-8 sequence. Both release what is pending when `final`.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.tokens = list(prompt_token_ids[-self.CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self._backend = streaming_backend(tokenizer)
        self._stream = DecodeStream(ids=self.tokens, skip_special_tokens=skip_special_tokens) \
            if self._backend is not None else None

    def decode(self, token_ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens,
                                     spaces_between_special_tokens=self.spaces_between_special_tokens)

    def step(self, new_token_ids: list[int], final: bool = False) -> str:
        """Append tokens; return the text that is now complete (all of it when `final`)."""
        if self._stream is None:
            self.tokens.extend(new_token_ids)
            return self._window_delta(final)
        text = ""
        for token_id in new_token_ids:
            self.tokens.append(token_id)
            chunk = self._stream.step(self._backend, token_id)
            if chunk is not None:
                text += chunk
                self.prefix_offset, self.read_offset = max(0, len(self.tokens) - self.CONTEXT_TOKENS), len(self.tokens)
        if final and self.read_offset < len(self.tokens):  # an incomplete character at the very end
            text += self._window_delta(final=True)
        return text

    def _window_delta(self, final: bool) -> str:
        prefix_text = self.decode(self.tokens[self.prefix_offset:self.read_offset])
        full_text = self.decode(self.tokens[self.prefix_offset:])
        if len(full_text) > len(prefix_text) and (final or not full_text.endswith("\ufffd")):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return full_text[len(prefix_text):]
        return ""
