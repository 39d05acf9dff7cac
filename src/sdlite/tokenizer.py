"""The OpenAI CLIP byte-level BPE tokenizer, as Stable Diffusion v1 uses it.

Behaviour follows OpenAI's original `simple_tokenizer` (the algorithm is re-implemented here):
text is cleaned with ftfy and HTML unescaping, whitespace is collapsed, everything is lowercased,
split into words by CLIP's pattern, and every word is encoded as UTF-8 bytes mapped onto
printable characters, then merged by BPE rank. A literal ``<|endoftext|>`` that the pattern
finds as a word of its own becomes the EOS id, as in the original.

A prompt becomes ``[BOS] + tokens + [EOS]``, truncated so that EOS stays last and padded with EOS
to the context length (77), exactly as SD v1 feeds its text encoder.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from dataclasses import dataclass
from importlib import resources

import ftfy
import regex
import torch

from .errors import InputError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary has 49408 entries: 2 x 256 byte symbols, the merges, and 2 specials.
# Only this many merges of the file are used (the file holds more).
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77
# Distinct words remembered by the BPE cache before it is emptied (bounds memory in long runs).
CACHE_LIMIT = 100_000

# CLIP's word pattern: specials, English contractions, runs of letters, single digits,
# runs of anything else that is not whitespace. Applied to lowercased text.
_WORD_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Map each byte value to a printable character, in CLIP's vocabulary order.

    Bytes that are already printable, non-space Latin-1 characters map to themselves (and come
    first); the remaining 68 bytes map to code points 256, 257, ... in increasing byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    for offset, byte in enumerate(others):
        table[byte] = chr(256 + offset)
    return table


@dataclass(frozen=True)
class TokenizedText:
    """One prompt as SD v1 feeds it to the text encoder."""

    ids: list[int]  # exactly `length` ids: BOS, tokens, EOS, EOS-padding
    num_truncated: int  # how many BPE tokens were dropped to fit (0 if none)


def _read_vocab_file(vocab_path: str | os.PathLike | None) -> str:
    """The text of the gzipped merges file (the shipped one by default)."""
    try:
        if vocab_path is None:
            data = (resources.files("sdlite") / "data" / VOCAB_FILE).read_bytes()
        else:
            with open(vocab_path, "rb") as handle:
                data = handle.read()
        return gzip.decompress(data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        where = vocab_path if vocab_path is not None else f"package data {VOCAB_FILE}"
        raise InputError(f"cannot read the CLIP BPE vocabulary ({where}): {exc}") from exc


def _parse_merges(text: str) -> list[tuple[str, str]]:
    """The merges CLIP uses: lines 1..NUM_MERGES (line 0 is a version header)."""
    lines = text.split("\n")[1:NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise InputError(
            f"not a CLIP BPE vocabulary: expected {NUM_MERGES} merge lines of two symbols each")
    return merges


def _merge_pair(symbols: list[str], first: str, second: str) -> list[str]:
    """Replace every non-overlapping (first, second) neighbour pair, scanning left to right."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if symbols[i] == first and i + 1 < len(symbols) and symbols[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class CLIPTokenizer:
    """OpenAI CLIP BPE tokenizer (49408 ids; BOS 49406, EOS 49407).

    ``tok("a cat")`` gives a (1, 77) LongTensor ready for the SD v1 text encoder;
    ``tok.tokenize(text)`` also reports how many tokens were truncated.
    """

    BOS = 49406
    EOS = 49407

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        """Load the BPE merges from `vocab_path` (default: the file shipped with sdlite)."""
        merges = _parse_merges(_read_vocab_file(vocab_path))
        self._byte_encoder = byte_to_unicode()
        self._byte_decoder = {char: byte for byte, char in self._byte_encoder.items()}
        symbols = list(self._byte_encoder.values())
        self._vocab = [*symbols, *(s + END_OF_WORD for s in symbols),
                       *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]
        self._encoder = {token: i for i, token in enumerate(self._vocab)}
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._cache: dict[str, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self._vocab)

    def clean(self, text: str) -> str:
        """OpenAI's text cleaning: ftfy, HTML-unescape twice, collapse whitespace, lowercase."""
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return _WHITESPACE.sub(" ", text).strip().lower()

    def encode(self, text: str) -> list[int]:
        """BPE ids of the cleaned `text`, without BOS/EOS."""
        if not isinstance(text, str):
            raise InputError(f"a prompt must be a string, got {type(text).__name__}")
        ids: list[int] = []
        for word in _WORD_PATTERN.findall(self.clean(text)):
            ids.extend(self._encoder[symbol] for symbol in self._bpe(word))
        return ids

    def decode(self, ids) -> str:
        """Text of `ids` (end-of-word marks become spaces); for messages and debugging."""
        ids = [int(i) for i in ids]
        if any(not 0 <= i < len(self._vocab) for i in ids):
            raise InputError(f"token ids must lie in [0, {len(self._vocab)}), got {ids}")
        text = "".join(self._vocab[i] for i in ids)
        data = bytes(self._byte_decoder[char] for char in text)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def tokenize(self, text: str, length: int = CONTEXT_LENGTH) -> TokenizedText:
        """``[BOS] + ids + [EOS]`` padded with EOS to `length`, truncated so that EOS stays last."""
        if length < 2:
            raise InputError(f"token length must be at least 2 (BOS and EOS), got {length}")
        ids = self.encode(text)
        kept = ids[:length - 2]
        body = [self.BOS, *kept, self.EOS]
        padding = [self.EOS] * (length - len(body))
        return TokenizedText(ids=body + padding, num_truncated=len(ids) - len(kept))

    def __call__(self, texts: str | list[str], length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """Token ids of one prompt or a list of prompts: a (B, length) LongTensor."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        rows = [self.tokenize(text, length).ids for text in batch]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Vocabulary symbols of one pre-tokenized word (cached)."""
        symbols = self._cache.get(word)
        if symbols is None:
            symbols = self._bpe_uncached(word)
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = symbols
        return symbols

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        if word in (BOS_TOKEN, EOS_TOKEN):  # literal specials in the text stay whole
            return (word,)
        chars = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
        symbols = [*chars[:-1], chars[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=self._rank)
            if pair not in self._ranks:
                break
            symbols = _merge_pair(symbols, *pair)
        return tuple(symbols)

    def _rank(self, pair: tuple[str, str]) -> float:
        return self._ranks.get(pair, float("inf"))


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> CLIPTokenizer:
    """The process-wide tokenizer with the shipped vocabulary (loaded once, on first use)."""
    return CLIPTokenizer()
