"""N-gram prompt lookup (vLLM's `ngram` method): the request's own tokens predict its next ones.

When the last n tokens (n from prompt_lookup_max down to prompt_lookup_min) occurred earlier in the
prompt or output, the tokens that followed that earlier occurrence are proposed. Copy-heavy work
(repeat, quote, edit a given text, code with repeated names) matches often; elsewhere nothing is
proposed and the request decodes as usual. The latest earlier occurrence wins (vLLM takes the
first; the latest is the likelier continuation when text repeats with edits).
"""

from __future__ import annotations


def propose_ngram(token_ids: list[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to `num_tokens` proposed next tokens, or [] when no suffix of length min_n..max_n recurs."""
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = token_ids[length - n:]
        first = suffix[0]
        # Scan earlier starts from the latest; the suffix itself (start = length - n) is excluded.
        start = length - n - 1
        while start >= 0:
            try:
                start = _rindex(token_ids, first, start)
            except ValueError:
                break
            if token_ids[start:start + n] == suffix:
                return token_ids[start + n:start + n + num_tokens]
            start -= 1
    return []


def _rindex(values: list[int], value: int, last: int) -> int:
    """The largest index <= last holding value."""
    for index in range(last, -1, -1):
        if values[index] == value:
            return index
    raise ValueError(value)
