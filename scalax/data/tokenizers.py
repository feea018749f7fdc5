"""Tokenizers: byte-level (the default; needs nothing), a BPE trained locally with `tokenizers`, and any
Hugging Face `tokenizer.json` the user supplies (GPT-2's, Llama 3's, ...: whatever `tokenizers` loads).

Each has a `hash` that token caches and checkpoints record, so data of another tokenizer never goes unnoticed.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from scalax import io
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
        serialized = io.read_text(path)
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


# A file's end-of-text token: the first of these it has (GPT-2, Llama 3, Llama 2 / SentencePiece, Gemma, ChatML).
EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


class FileTokenizer(BpeTokenizer):
    """A Hugging Face `tokenizer.json` (any model `tokenizers` loads), with its own end-of-text token."""

    def __init__(self, tokenizer, serialized: str, path: str):
        super().__init__(tokenizer, serialized)
        self.name = f"file:{path}"
        self.eos_id = next((i for t in EOS_TOKENS if (i := tokenizer.token_to_id(t)) is not None), None)
        if self.eos_id is None:
            raise ConfigError("data.tokenizer", f"{path} has no end-of-text token; allowed: a tokenizer with one "
                              f"of {', '.join(EOS_TOKENS)}")

    def encode(self, data: bytes) -> np.ndarray:  # no special tokens added: documents are joined with eos
        return np.asarray(self._tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False).ids,
                          np.uint32)

    def encode_batch(self, documents: list[bytes]) -> list[np.ndarray]:
        texts = [d.decode("utf-8", errors="replace") for d in documents]
        return [np.asarray(e.ids, np.uint32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]


def is_file(tokenizer: str) -> bool:
    """`data.tokenizer` names a file (or a directory holding tokenizer.json) rather than byte or bpe."""
    return tokenizer not in TOKENIZERS


def load_file(tokenizer: str) -> FileTokenizer:
    """The tokenizer.json that `data.tokenizer` names (a file, or a directory holding one; local or gs://)."""
    path = io.join(tokenizer, "tokenizer.json") if io.isdir(tokenizer) else tokenizer
    if not io.isfile(path):
        raise ConfigError("data.tokenizer", f"unknown tokenizer {tokenizer!r}: not byte or bpe, and no such file; "
                          "allowed: byte, bpe, or a Hugging Face tokenizer.json (or a directory holding one)")
    stamp = os.stat(path).st_mtime_ns if not io.is_remote(path) else io.getsize(path)
    return _read(path, stamp)


@functools.lru_cache(maxsize=8)
def _read(path: str, stamp: int) -> FileTokenizer:
    """Read and parse once per process (config, cache key and data all ask); again if the file changed."""
    serialized = io.read_text(path, errors="replace")
    try:
        tok = Tokenizer.from_str(serialized)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError("data.tokenizer", f"{path} does not load as a tokenizer.json ({first}); allowed: a "
                          "Hugging Face tokenizer.json, as `tokenizers.Tokenizer.from_file` reads it") from None
    return FileTokenizer(tok, serialized, path)


def vocab_size(tokenizer: str, bpe_vocab_size: int, multiple: int = 1) -> int:
    """The vocabulary a tokenizer choice gives (a model's vocab_size 0 means it), rounded up to a multiple of
    `multiple` (data.vocab_multiple; e.g. 128, so that the tensor axis divides it)."""
    if multiple <= 0:
        raise ConfigError("data.vocab_multiple", f"must be a positive integer, got {multiple}")
    if tokenizer == "byte":
        n = ByteTokenizer.vocab_size
    elif tokenizer == "bpe":
        n = bpe_vocab_size
    else:
        n = load_file(tokenizer).vocab_size
    return -(-n // multiple) * multiple


def check_name(tokenizer: str) -> None:
    if is_file(tokenizer):
        load_file(tokenizer)


def bpe_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, "tokenizer.json")
