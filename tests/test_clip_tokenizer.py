"""The CLIP tokenizer against OpenAI's SimpleTokenizer (test-only openai-clip package)."""

import pytest
import torch

from text import tokenize
from text.tokenizer import TokenizerLengthError, get_tokenizer
from utils.errors import UserError
from tests.fixtures import openai_clip_module

TEXTS = [
    "A photo of a X X X X person.",
    "A photo of a X X X X  person from X view.",
    "ground aerial",
    "",
    "   ",
    "Hello, World!!! It's a man's bag; they'll've gone... (really?) #tag @user 50% off $3.99",
    "naïve café Ünïcödé ß ﬁ ½ Ⅻ 東京タワー 😀👍🏽 ✓",
    "Tom &amp; Jerry &lt;b&gt;bold&lt;/b&gt; &amp;amp; &#39;quoted&#39; &quot;x&quot;",
    "mojibake: cafÃ© â€œquotesâ€\x9d",
    "tabs\tand\nnewlines\r\n  and   spaces",
    "<|startoftext|>special<|endoftext|> tokens in text",
    "1234567890 3.14159 2nd 21st",
    "UPPER lower MiXeD CaSe",
    "a woman wearing a red jacket, blue jeans and white sneakers, carrying a black backpack",
]


def _openai_tokenizer():
    return openai_clip_module("simple_tokenizer").SimpleTokenizer()


@pytest.fixture(scope="module")
def openai_tokenizer():
    return _openai_tokenizer()


def openai_tokenize(tokenizer, text, context_length=77):
    """OpenAI's ``clip.tokenize`` rule with truncate=True (clip/clip.py itself needs pkg_resources)."""
    ids = [tokenizer.encoder["<|startoftext|>"], *tokenizer.encode(text), tokenizer.encoder["<|endoftext|>"]]
    if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = tokenizer.encoder["<|endoftext|>"]
    return ids + [0] * (context_length - len(ids))


def test_ids_match_openai(openai_tokenizer):
    tokens = tokenize(TEXTS)
    assert tokens.dtype == torch.long and tokens.shape == (len(TEXTS), 77)
    for text, row in zip(TEXTS, tokens.tolist()):
        assert row == openai_tokenize(openai_tokenizer, text), text


def test_bpe_of_every_word_matches_openai(openai_tokenizer):
    # Words from a slice of the vocabulary exercise many different merge paths.
    words = [symbol.replace("</w>", "") for symbol in get_tokenizer().id_to_symbol[1000:49406:97]]
    for word in words:
        assert list(get_tokenizer().encode(word)) == openai_tokenizer.encode(word), word


def test_truncation_matches_openai(openai_tokenizer):
    long_text = " ".join(TEXTS) * 3
    for context_length in (77, 100, 16):
        row = tokenize(long_text, context_length=context_length, truncate=True)[0].tolist()
        assert row == openai_tokenize(openai_tokenizer, long_text, context_length)
        assert row[-1] == get_tokenizer().end_id == max(row)


def test_over_long_text_raises_one_line_error():
    with pytest.raises(TokenizerLengthError) as info:
        tokenize("person " * 200, context_length=77)
    message = str(info.value)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert "\n" not in message and "202 tokens" in message and "77" in message


def test_longer_context_and_padding(openai_tokenizer):
    tokens = tokenize(["a photo", "ground aerial"], context_length=100)
    assert tokens.shape == (2, 100)
    assert tokens[0].tolist() == openai_tokenize(openai_tokenizer, "a photo", 100)
    # End-of-text is the largest id, so argmax finds it (what the text encoder relies on).
    assert tokens.argmax(-1).tolist() == [3, 3]


def test_single_string_and_repeated_calls_are_consistent():
    first = tokenize("A photo of a X X X X person.")
    assert first.shape == (1, 77)
    batch = tokenize(["A photo of a X X X X person."] * 5)
    assert torch.equal(batch, first.expand(5, -1))
    batch[0, 1] = 7  # the returned tensor is fresh: editing it must not poison the cache
    assert torch.equal(tokenize("A photo of a X X X X person."), first)


def test_decode_round_trip():
    tokenizer = get_tokenizer()
    assert tokenizer.decode(tokenizer.encode("Hello, World! café")) == "hello , world ! café "
