"""CLIP's byte-level BPE tokenizer (49 408 ids), written from the published format of its vocabulary file."""
import functools
import gzip
import html
import os

import ftfy
import regex
import torch

from utils.errors import UserError

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
# The vocabulary file holds a header line followed by merges; CLIP uses the first 49152 - 256 - 2 of them.
NUM_MERGES = 49152 - 256 - 2
WORD_END = "</w>"

# Special tokens, English contractions, letter runs, single digits, runs of other non-space symbols.
_SPLIT_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


class TokenizerLengthError(UserError, ValueError):
    """A text needs more tokens than the context length and truncation is off."""


def _byte_alphabet():
    """Map every byte 0..255 to a printable unicode character (printable Latin-1 bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _normalize(text):
    """Repair mojibake, unescape HTML (twice, for doubly escaped text), collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class BPETokenizer:
    """Text -> CLIP token ids, without start/end tokens."""

    def __init__(self, vocab_path=VOCAB_PATH):
        with gzip.open(vocab_path, "rt", encoding="utf-8") as handle:
            merge_lines = handle.read().split("\n")[1:NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in merge_lines]
        self.byte_to_char = _byte_alphabet()
        alphabet = list(self.byte_to_char.values())
        symbols = alphabet + [char + WORD_END for char in alphabet] + ["".join(pair) for pair in merges]
        symbols += [START_TOKEN, END_TOKEN]
        self.symbol_to_id = {symbol: index for index, symbol in enumerate(symbols)}
        self.id_to_symbol = symbols
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.start_id = self.symbol_to_id[START_TOKEN]
        self.end_id = self.symbol_to_id[END_TOKEN]
        self._char_to_byte = {char: byte for byte, char in self.byte_to_char.items()}
        # Per-instance caches (a method-level lru_cache would be shared across instances and keep them alive).
        self.word_ids = functools.lru_cache(maxsize=1 << 16)(self._word_ids)
        self.encode = functools.lru_cache(maxsize=1 << 14)(self._encode)

    def _merge(self, word):
        """Apply BPE merges to one byte-mapped word; returns its list of symbols."""
        parts = list(word[:-1]) + [word[-1] + WORD_END]
        while len(parts) > 1:
            ranked = [(self.merge_rank.get(pair, NUM_MERGES), index)
                      for index, pair in enumerate(zip(parts, parts[1:]))]
            best_rank, best_index = min(ranked)
            if best_rank == NUM_MERGES:
                break
            first, second = best = (parts[best_index], parts[best_index + 1])
            merged, index = [], 0
            while index < len(parts):
                if index + 1 < len(parts) and (parts[index], parts[index + 1]) == best:
                    merged.append(first + second)
                    index += 2
                else:
                    merged.append(parts[index])
                    index += 1
            parts = merged
        return parts

    def _word_ids(self, word):
        if word in (START_TOKEN, END_TOKEN):
            return (self.symbol_to_id[word],)
        mapped = "".join(self.byte_to_char[byte] for byte in word.encode("utf-8"))
        return tuple(self.symbol_to_id[symbol] for symbol in self._merge(mapped))

    def _encode(self, text):
        ids = []
        for word in _SPLIT_PATTERN.findall(_normalize(text)):
            ids.extend(self.word_ids(word))
        return tuple(ids)

    def decode(self, ids):
        """Token ids -> text (word ends become spaces); start/end tokens are kept as written."""
        text = "".join(self.id_to_symbol[int(index)] for index in ids)
        data = bytearray(ord(" ") if char == " " else self._char_to_byte[char]
                         for char in text.replace(WORD_END, " "))
        return data.decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The shared tokenizer (the vocabulary is read once per process)."""
    return BPETokenizer()


@functools.lru_cache(maxsize=1 << 14)
def _padded_ids(text, context_length, truncate):
    tokenizer = get_tokenizer()
    ids = (tokenizer.start_id, *tokenizer.encode(text), tokenizer.end_id)
    if len(ids) > context_length:
        if not truncate:
            preview = text if len(text) <= 40 else text[:37] + "..."
            raise TokenizerLengthError(f"text {preview!r} is {len(ids)} tokens long (with start/end tokens) "
                                       f"but the context length is {context_length}; shorten it or use "
                                       f"truncate=True")
        ids = ids[:context_length - 1] + (tokenizer.end_id,)
    return ids + (0,) * (context_length - len(ids))


def tokenize(texts, context_length=77, truncate=False):
    """Tokenize a string or a list of strings into CLIP ids, padded with zeros: LongTensor (N, context_length).

    Each row is start token, BPE ids, end token. Over-long texts raise ``TokenizerLengthError`` unless
    ``truncate`` is set, which keeps the first ``context_length - 1`` ids and ends with the end token.
    """
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
    rows = [_padded_ids(text, context_length, bool(truncate)) for text in texts]
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), context_length)
