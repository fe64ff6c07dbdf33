"""The text of plain streams, made by the web process from the token ids the engine sends.

An engine replica steps every stream of its batch on one thread, and detokenizing each stream's token
every step was ~2 ms of its ~14 ms of host work a step at 1,000 streams (benchmarks/RESULTS.md): work
that holds up the device once the host is the bottleneck. A stream needs its text in the engine only
to find stop strings in it or to name logprobs' tokens; for every other ("plain") stream the web
process, one of many, turns the ids into text instead, with the same DecodeStream over the same
tokenizer JSON. The ModelCard says whether that is the engine's own text (`streams_backend_text`: no
clean-up of transformers' on top); without it the engine detokenizes, as before.
"""
from __future__ import annotations

from tokenizers import Tokenizer

from engine.service.protocol import ModelCard, OutputDelta
from engine.tokenization import IncrementalDetokenizer


def web_detokenizes(card: ModelCard, tokenizer: Tokenizer | None, fields: dict) -> bool:
    """Whether a call with these SamplingParams fields streams token ids only (its engine request then
    says `detokenize: False`)."""
    return (card.streams_backend_text and tokenizer is not None and not fields.get("stop")
            and fields.get("logprobs") is None and fields.get("prompt_logprobs") is None)


class StreamText:
    """One prompt's choices (`n` of them): each delta's text, from its token ids, in stream order."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self.skip_special_tokens = skip_special_tokens
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}

    def fill(self, delta: OutputDelta) -> None:
        for output in delta.outputs:
            detokenizer = self.detokenizers.get(output.index)
            if detokenizer is None:
                detokenizer = self.detokenizers[output.index] = IncrementalDetokenizer(
                    self.tokenizer, self.prompt_token_ids, self.skip_special_tokens)
            # The engine releases a character left incomplete at the very end: so does the last delta.
            output.text = detokenizer.step(output.token_ids, final=output.finish_reason is not None)
