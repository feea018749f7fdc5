"""Tokenizers: byte-level (the default; needs nothing) and BPE trained locally with `tokenizers`.

Each has a `hash` that token caches and checkpoints record, so data of another tokenizer never goes unnoticed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from scalax.errors import ConfigError

TOKENIZERS = ("byte", "bpe")
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|endoftext|>", "<|unk|>")


class ByteTokenizer:
    """Token = byte value (0..255); then pad 256, bos 257, eos 258, unk 259. Vocabulary 260."""

    name = "byte"
    vocab_size = 256 + len(SPECIAL_TOKENS)
    eos_id = 256 + SPECIAL_TOKENS.index("<|endoftext|>")
    hash = hashlib.sha256(b"scalax-byte-tokenizer-v1").hexdigest()

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BpeTokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenisation) from the `tokenizers` library."""

    name = "bpe"

    def __init__(self, tokenizer, serialized: str):
        self._tok = tokenizer
        self._json = serialized
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id("<|endoftext|>")
        self.hash = hashlib.sha256(serialized.encode()).hexdigest()

    @classmethod
    def train(cls, documents: Iterable[bytes], vocab_size: int) -> BpeTokenizer:
        tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator((d.decode("utf-8", errors="replace") for d in documents), trainer=trainer)
        return cls(tok, tok.to_str())

    @classmethod
    def load(cls, path: str) -> BpeTokenizer:
        with open(path) as f:
            serialized = f.read()
        return cls(Tokenizer.from_str(serialized), serialized)

    def to_str(self) -> str:
        return self._json

    def encode(self, data: bytes) -> np.ndarray:
        return np.asarray(self._tok.encode(data.decode("utf-8", errors="replace")).ids, np.uint32)

    def encode_batch(self, documents: list[bytes]) -> list[np.ndarray]:
        texts = [d.decode("utf-8", errors="replace") for d in documents]
        return [np.asarray(e.ids, np.uint32) for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def vocab_size(tokenizer: str, bpe_vocab_size: int) -> int:
    """The vocabulary a tokenizer choice gives, known from the config alone (a model's vocab_size 0 means it)."""
    check_name(tokenizer)
    return ByteTokenizer.vocab_size if tokenizer == "byte" else bpe_vocab_size


def check_name(tokenizer: str) -> None:
    if tokenizer not in TOKENIZERS:
        raise ConfigError("data.tokenizer", f"unknown tokenizer {tokenizer!r}; allowed: {', '.join(TOKENIZERS)}")


def bpe_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, "tokenizer.json")
