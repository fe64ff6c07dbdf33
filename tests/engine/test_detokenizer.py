"""IncrementalDetokenizer on the bundled tokenizer: token-by-token text equals a full decode,
and no delta ever carries half a character (U+FFFD)."""

import pytest

from engine.tokenization import IncrementalDetokenizer

TEXTS = [
    "Plain ASCII text, with punctuation: (a) [b] {c}; done.",
    "Accents: café, naïve, façade, Ångström, jalapeño, Dvořák, Łódź, ĳ.",
    "CJK: 日本語のテキストです。中文也可以。한국어 문장도 있습니다.",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 robot 🤖 done",
    "Mixed 🤖 and 漢字 and émigré ✓ → ∑ ≠ ∞ — “quotes” «guillemets» 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "   leading spaces\n\nnew lines\tand tabs  ",
]
PROMPTS = ["", "Hello", "Translate to Japanese: 猫", "🎉🎉"]


def stream(detokenizer, token_ids):
    deltas = []
    for i, token_id in enumerate(token_ids):
        deltas.append(detokenizer.step([token_id], final=i == len(token_ids) - 1))
    return deltas


def test_some_text_really_splits_characters_across_tokens(bundled_tokenizer):
    """Guard on the test data: at least one character spans several tokens, so decoding a
    single token yields U+FFFD and the detokenizer has something to hold back."""
    split = [t for text in TEXTS for t in bundled_tokenizer.encode(text, add_special_tokens=False)
             if "\ufffd" in bundled_tokenizer.decode([t])]
    assert split


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_token_by_token_equals_full_decode(bundled_tokenizer, text, prompt):
    prompt_ids = bundled_tokenizer.encode(prompt, add_special_tokens=False)
    token_ids = bundled_tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(bundled_tokenizer, prompt_ids)
    deltas = stream(detokenizer, token_ids)
    assert "".join(deltas) == bundled_tokenizer.decode(token_ids)
    assert "".join(deltas) == text
    for delta in deltas:
        assert "\ufffd" not in delta


def test_deltas_are_complete_characters_as_soon_as_possible(bundled_tokenizer):
    """Each delta is released once its characters are complete: never later than the token
    that completes them."""
    text = "a😀b"
    token_ids = bundled_tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(bundled_tokenizer, [])
    so_far = ""
    for i, token_id in enumerate(token_ids):
        so_far += detokenizer.step([token_id])
        complete_characters = bundled_tokenizer.decode(token_ids[:i + 1]).rstrip("\ufffd")
        assert so_far == complete_characters
    assert so_far == text


def test_special_tokens_are_skipped_or_kept(bundled_tokenizer):
    text_ids = bundled_tokenizer.encode("Hi there", add_special_tokens=False)
    eos = bundled_tokenizer.eos_token_id
    ids = text_ids + [eos]
    skipped = "".join(stream(IncrementalDetokenizer(bundled_tokenizer, [], skip_special_tokens=True), ids))
    kept = "".join(stream(IncrementalDetokenizer(bundled_tokenizer, [], skip_special_tokens=False), ids))
    assert skipped == "Hi there"
    assert kept == "Hi there" + bundled_tokenizer.eos_token


def test_a_long_generation_matches_with_a_long_prompt(bundled_tokenizer):
    prompt_ids = bundled_tokenizer.encode("Context. " * 50, add_special_tokens=False)
    text = " ".join(TEXTS) * 3
    token_ids = bundled_tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(bundled_tokenizer, prompt_ids), token_ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_the_final_step_releases_a_character_left_incomplete(bundled_tokenizer):
    """A generation cut off inside a multi-byte character still shows what it has (as U+FFFD),
    exactly as a full decode does."""
    token_ids = bundled_tokenizer.encode("ok 😀", add_special_tokens=False)
    split = next(i for i in range(1, len(token_ids) + 1) if bundled_tokenizer.decode(token_ids[:i]).endswith("\ufffd"))
    deltas = stream(IncrementalDetokenizer(bundled_tokenizer, []), token_ids[:split])
    assert "".join(deltas) == bundled_tokenizer.decode(token_ids[:split])


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_the_fast_and_the_window_detokenizers_agree(bundled_tokenizer, text):
    prompt_ids = bundled_tokenizer.encode("Say it:", add_special_tokens=False)
    token_ids = bundled_tokenizer.encode(text, add_special_tokens=False)
    fast = IncrementalDetokenizer(bundled_tokenizer, prompt_ids)
    window = IncrementalDetokenizer(bundled_tokenizer, prompt_ids)
    window._stream = window._backend = None  # the path of tokenizers without a Rust backend
    assert fast._stream is not None
    assert stream(fast, token_ids) == stream(window, token_ids)


def test_a_bpe_tokenizer_that_asks_for_space_clean_up_still_streams_on_the_fast_path(bundled_tokenizer):
    """Llama 3's tokenizer sets clean_up_tokenization_spaces; transformers ignores it for BPE, so
    decode() is the backend's text and the DecodeStream path (5x cheaper a token) gives it exactly."""
    import copy

    tokenizer = copy.deepcopy(bundled_tokenizer)
    tokenizer.clean_up_tokenization_spaces = True
    text = "Wait . Really , it's done ! Isn't it ? We've seen 're and 'm too ."
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(token_ids) == text  # the clean-up did not apply
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert detokenizer._stream is not None
    assert "".join(stream(detokenizer, token_ids)) == text


def test_a_tokenizer_whose_decode_cleans_up_spaces_streams_what_decode_returns():
    """A WordPiece-style tokenizer whose decoder keeps " ." but whose transformers decode() cleans it
    up: the stream takes the window path, which decodes through transformers, and matches decode()."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "a", ".", "b", ",", "c", "!", "d", "?", "e", "'", "s", "hello", "world"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=True, unk_token="[UNK]")
    token_ids = backend.encode("hello world . a , b ! c ? d").ids
    assert tokenizer.decode(token_ids) == "hello world. a, b! c? d" != backend.decode(token_ids)
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert detokenizer._stream is None
    assert "".join(stream(detokenizer, token_ids)) == tokenizer.decode(token_ids)


def test_a_token_s_text_is_what_decode_gives_for_it(bundled_tokenizer):
    """Logprobs' decoded tokens, specials and ids that are half a character included."""
    from engine.tokenization import token_text

    ids = [*range(0, 40), *range(1000, 49152, 97), bundled_tokenizer.eos_token_id]
    assert [token_text(bundled_tokenizer, i) for i in ids] == [bundled_tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in token_text(bundled_tokenizer, i) for i in ids)
