"""The grain input pipeline: windows of seq_len + 1 tokens, a seeded shuffle per epoch, this process's slice,
batches, prefetch. The iterator's state (`get_state()`) goes into every checkpoint.

Window i is tokens[i·T : i·T + T + 1]: consecutive windows overlap by one token, so every token but the first
is a target exactly once an epoch. Global batch b holds shuffled windows [b·B, (b+1)·B); process p of P reads
rows p, p + P, ... of it, so the global batch is the same whatever the process count. The order is that of
grain's `MapDataset.shuffle(seed).repeat()` over the windows (epoch e permuted by grain's index_shuffle with seed
`seed + e`), read a batch at a time: one gather per batch instead of grain's per-window reads (0.41-0.64 ms a
batch of 14-22 windows through the iterator on one core, now 0.12-0.15 ms, which millisecond steps notice).
"""

from __future__ import annotations

import sys

import grain
import numpy as np

from scalax.data.corpora import available_cores
from scalax.errors import ConfigError


class Windows:
    """Random-access source of [seq_len + 1] int32 windows over a flat token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.view_NxT1 = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::seq_len] if len(self) else None

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], np.int32)

    def take(self, ids) -> np.ndarray:
        """Windows `ids` in one gather: [len(ids), seq_len + 1] int32."""
        return np.asarray(self.view_NxT1[np.asarray(ids, np.int64)], np.int32)


class ShuffledBatches:
    """Random-access source of this process's rows of global batch b, endless: [B / P, seq_len + 1] int32."""

    def __init__(self, windows: Windows, global_batch: int, seed: int, process_index: int, process_count: int):
        self.windows, self.global_batch, self.seed, self.n = windows, global_batch, seed, len(windows)
        self.rows = np.arange(process_index, global_batch, process_count)

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, b: int) -> np.ndarray:
        epochs, positions = np.divmod(int(b) * self.global_batch + self.rows, self.n)
        ids = [grain.experimental.index_shuffle(int(i), max_index=self.n - 1, seed=(self.seed + int(e)) % 2**32,
                                                rounds=4) for e, i in zip(epochs, positions, strict=True)]
        return self.windows.take(ids)


def check_tokens(tokens: np.ndarray, seq_len: int, vocab_size: int, max_token_id: int, split: str) -> None:
    """Refuse a split too short for one window, or token ids the model's embedding cannot hold (an
    out-of-range id in an embedding lookup gives a silent NaN, not an error)."""
    if len(tokens) < seq_len + 1:
        key = "data.val_fraction" if split == "val" else "data.corpus"
        raise ConfigError(key, f"the {split} split has {len(tokens)} tokens; one window needs train.seq_len + 1 = "
                          f"{seq_len + 1}: use a larger corpus or a shorter train.seq_len")
    if max_token_id >= vocab_size:
        raise ConfigError("model.vocab_size", f"{vocab_size} is too small for the token ids of this corpus "
                          f"(up to {max_token_id}); allowed: at least {max_token_id + 1}")


def train_dataset(tokens: np.ndarray, seq_len: int, global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """An endless MapDataset of this process's [global_batch / process_count, seq_len + 1] batches (tokens holds at
    least one window: check_tokens)."""
    if global_batch % process_count:
        raise ConfigError("train.batch_size", f"{global_batch} is not divisible by the process count {process_count}")
    return grain.MapDataset.source(ShuffledBatches(Windows(tokens, seq_len), global_batch, seed, process_index,
                                                   process_count))


def read_threads() -> int:
    """Reader threads: 2, or 1 where this process may use one CPU (a sweep's runs pinned one to a core), where a
    second thread only contends with the train loop (the quickstart's smallest model: 1.15x the steps/s)."""
    return min(2, available_cores())


def iterator(ds: grain.MapDataset, prefetch: int = 16) -> grain.DatasetIterator:
    """A checkpointable iterator with `prefetch` batches read ahead on background threads."""
    options = grain.ReadOptions(num_threads=read_threads(), prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def eval_windows(tokens: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """A fixed set of up to `count` validation windows, evenly spaced over the split: [n, seq_len + 1]."""
    windows = Windows(tokens, seq_len)
    n = min(count, len(windows))
    idx = np.linspace(0, len(windows) - 1, n).round().astype(int) if n > 1 else np.zeros(n, int)
    return np.stack([windows[i] for i in np.unique(idx)])


def eval_batches(windows_NxT1: np.ndarray, batch_size: int):
    """`windows` in consecutive batches of `batch_size`, the last one padded with copies of its first window (one
    program for all): yields (batch [batch_size, T + 1], how many of its windows are real, from the first)."""
    for i in range(0, len(windows_NxT1), batch_size):
        chunk = windows_NxT1[i : i + batch_size]
        yield np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), axis=0)]), len(chunk)
