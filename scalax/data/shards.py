"""Token shards: a corpus tokenized in bounded memory, in parallel over the machine's cores, into fixed-size
files per split with an index; resumable after a kill (finished shards are kept) and deterministic (the same
shards for the same documents, whatever the number of workers).

A shard directory holds:
- `header.json`, the index, written last (a header means the shards are complete): version, dtype, tokenizer,
  corpus fingerprint, counts per split, `shard_tokens`, and `shards`: {split: [{"name", "tokens"}, ...]}.
- `{split}-{k:05d}.bin`: flat token ids (uint16, or uint32 for vocabularies over 65,536), `shard_tokens` of
  them in each but a split's last. Documents follow one another, each closed by the end-of-text token, and
  run on from one shard file into the next.
- `progress.json`, while building: each split's finished shards and where in the corpus they end (documents
  wholly written, tokens of the next one already written), so that a killed build goes on from there.

The main process reads the documents in order and hands chunks of them (CHUNK_BYTES) to worker processes,
at most two chunks a worker in flight, and writes the tokens that come back in order: memory stays bounded
by the chunk size times the workers, whatever the corpus's size.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import glob
import itertools
import json
import multiprocessing
import operator
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from scalax import io
from scalax.errors import ConfigError
from scalax.io import atomic_write_bytes, atomic_write_json

VERSION = 2
SPLITS = ("train", "val")
SHARD_TOKENS = 100_000_000  # data.shard_tokens' default: nanoGPT's and llm.c's FineWeb shards hold as many
CHUNK_BYTES = 4 << 20  # text handed to a worker at a time
CHUNK_DOCS = 4096
BLOCK_BYTES = 64 << 10  # shards on a bucket are read in blocks of this many bytes ...
REMOTE_CACHE_BYTES = 256 << 20  # ... and a process keeps at most this many of them
MAX_UNDECODABLE = 0.01  # share of a corpus's bytes that may be invalid UTF-8 or NUL (the stdlib: 2e-6)


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.bin"


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def undecodable_bytes(data: bytes) -> int:
    """Bytes that are not UTF-8 text: each invalid sequence (one replacement character) and each NUL."""
    return data.decode("utf-8", errors="replace").count("\ufffd") + data.count(b"\0")


def check_text(corpus: str, total: int, bad: int, worst: list) -> None:
    """Refuse a corpus more than MAX_UNDECODABLE of whose `total` bytes are not text (`bad`; `worst`: the
    [count, document id] pairs of the documents with most) -- a binary file, a token file."""
    share = bad / max(total, 1)
    if share > MAX_UNDECODABLE:
        where = ", ".join(f"{doc_id} ({n:,} bytes)" for n, doc_id in sorted(worst, reverse=True)[:3] if n)
        raise ConfigError("data.corpus", f"{corpus} is not text: {share:.1%} of its bytes are invalid UTF-8 or NUL "
                          f"(most in {where}); allowed: at most {MAX_UNDECODABLE:.0%}, text files or .jsonl")


# ---------------------------------------------------------------------- reading
class TokenStream:
    """One split's tokens over its shard arrays (memory-mapped), read as one flat array: len(), [i], [a:b]."""

    def __init__(self, parts: list[np.ndarray], dtype: np.dtype | str):
        self.parts = [p for p in parts if len(p)]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _part(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, "right")) - 1

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("a TokenStream slices with step 1 only")
            pieces = []
            while start < stop:
                i = self._part(start)
                end = min(stop, int(self.offsets[i + 1]))
                pieces.append(self.parts[i][start - self.offsets[i]: end - self.offsets[i]])
                start = end
            if not pieces:
                return np.zeros(0, self.dtype)
            return np.asarray(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)
        index = operator.index(key)
        index += len(self) if index < 0 else 0
        if not 0 <= index < len(self):
            raise IndexError(f"token {key} of {len(self)}")
        i = self._part(index)
        return self.parts[i][index - self.offsets[i]]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


class BlockCache:
    """A process's bounded cache of shard blocks read from a bucket: BLOCK_BYTES-aligned blocks, the least
    recently used dropped beyond `capacity` bytes. Safe for grain's reader threads (the reads run unlocked)."""

    def __init__(self, capacity: int = REMOTE_CACHE_BYTES, block: int = BLOCK_BYTES):
        self.capacity, self.block = capacity, block
        self.blocks: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.fetched = 0  # bytes read from the bucket, for tests and benchmarks

    def read(self, path: str, size: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of the `size`-byte file at `path`: its missing blocks in one ranged read."""
        first, last = start // self.block, (end - 1) // self.block
        with self.lock:
            have = {b: self.blocks[(path, b)] for b in range(first, last + 1) if (path, b) in self.blocks}
            for b in have:
                self.blocks.move_to_end((path, b))
        missing = [b for b in range(first, last + 1) if b not in have]
        if missing:
            lo, hi = missing[0] * self.block, min((missing[-1] + 1) * self.block, size)
            data = io.read_range(path, lo, hi)
            with self.lock:
                self.fetched += len(data)
                for b in range(missing[0], missing[-1] + 1):
                    piece = data[(b - missing[0]) * self.block: (b - missing[0] + 1) * self.block]
                    have.setdefault(b, piece)
                    self.blocks[(path, b)] = piece
                    self.blocks.move_to_end((path, b))
                while len(self.blocks) * self.block > self.capacity and len(self.blocks) > 1:
                    self.blocks.popitem(last=False)
        joined = b"".join(have[b] for b in range(first, last + 1))
        return joined[start - first * self.block: end - first * self.block]


CACHE = BlockCache()


class RemoteShard:
    """A shard file on a bucket, read by window: `[a:b]` is one ranged read (of the blocks the cache lacks)."""

    def __init__(self, path: str, dtype: np.dtype | str, tokens: int, cache: BlockCache | None = None):
        self.path, self.dtype, self.tokens = path, np.dtype(dtype), tokens
        self.cache = cache or CACHE

    def __len__(self) -> int:
        return self.tokens

    def __getitem__(self, key):
        if not isinstance(key, slice):
            index = operator.index(key)
            return self[index: index + 1][0]
        start, stop, _ = key.indices(self.tokens)
        if stop <= start:
            return np.zeros(0, self.dtype)
        item = self.dtype.itemsize
        data = self.cache.read(self.path, self.tokens * item, start * item, stop * item)
        return np.frombuffer(data, self.dtype)


def open_split(directory: str, header: dict, split: str) -> TokenStream:
    """A split of a shard directory: memory-mapped when local, read by window (RemoteShard) on a bucket."""
    if io.is_remote(directory):
        parts = [RemoteShard(io.join(directory, s["name"]), header["dtype"], s["tokens"])
                 for s in header["shards"][split] if s["tokens"]]
    else:
        parts = [np.memmap(os.path.join(directory, s["name"]), dtype=header["dtype"], mode="r",
                           shape=(s["tokens"],)) for s in header["shards"][split] if s["tokens"]]
    return TokenStream(parts, header["dtype"])


def shard_files(header: dict) -> list[str]:
    return [s["name"] for split in SPLITS for s in header["shards"][split]]


@contextlib.contextmanager
def locked(directory: str):
    """Hold `directory`'s build lock: processes of one machine (a multi-process run) build a cache once."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------- tokenizing (in workers)
_WORKER: dict = {}


def _init_worker(tokenizer, dtype: str) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # tokenizers' own threads: one core per worker process
    _WORKER.update(tokenizer=tokenizer, dtype=dtype)


def _tokenize(chunk: list[tuple[str, str, bytes, int]], tokenizer=None, dtype: str | None = None) -> dict:
    """A chunk of (split, id, text, tokens to skip) documents -> per split: tokens (each document closed by
    end-of-text, its first `skip` dropped), tokens per document, bytes per document, undecodable bytes per
    document, the worst documents' [count, id], the first document's skip."""
    tokenizer = tokenizer or _WORKER["tokenizer"]
    dtype = dtype or _WORKER["dtype"]
    texts = [data for _, _, data, _ in chunk]
    pieces = tokenizer.encode_batch(texts) if hasattr(tokenizer, "encode_batch") else map(tokenizer.encode, texts)
    eos = np.asarray([tokenizer.eos_id], dtype)
    out: dict = {}
    for (split, doc_id, data, skip), ids in zip(chunk, pieces, strict=True):
        tokens, lengths, nbytes, bad, worst, _ = out.setdefault(split, ([], [], [], [], [], skip))
        ids = np.concatenate([ids.astype(dtype), eos])[skip:]
        tokens.append(ids)
        lengths.append(len(ids))
        nbytes.append(len(data))
        bad.append(undecodable_bytes(data))
        if bad[-1]:
            worst.append([bad[-1], doc_id])
    return {split: (np.concatenate(tokens), np.asarray(lengths, np.int64), np.asarray(nbytes, np.int64),
                    np.asarray(bad, np.int64), _worst(worst), skip0)
            for split, (tokens, lengths, nbytes, bad, worst, skip0) in out.items()}


def _worst(pairs: list) -> list:
    """The three [undecodable bytes, document id] pairs with most, each document once (a resumed build sees the
    document that a finished shard ends in again)."""
    return [list(p) for p in sorted({tuple(p) for p in pairs}, reverse=True)[:3]]


# ---------------------------------------------------------------------- writing
def _fresh_state() -> dict:
    return {"shards": [], "docs": 0, "skip": 0, "bytes": 0, "undecodable": 0, "worst": [], "max_token_id": 0}


class _Writer:
    """One split's shard writer. `state` holds what the finished shards hold (resumable); the counters of the
    documents written since live in `run` until the next shard finishes."""

    def __init__(self, directory: str, split: str, dtype: np.dtype, shard_tokens: int, state: dict,
                 save: Callable[[], None]):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.state, self.save = state, save
        self.run = {k: state[k] for k in ("docs", "bytes", "undecodable", "max_token_id")}
        self.run["worst"] = list(state["worst"])
        self.file, self.filled = None, 0

    @property
    def tokens(self) -> int:
        return sum(self.state["shards"]) + self.filled

    def write(self, tokens: np.ndarray, lengths: np.ndarray, nbytes: np.ndarray, bad: np.ndarray, worst: list,
              skip0: int) -> None:
        ends, cum_bytes, cum_bad = np.cumsum(lengths), np.cumsum(nbytes), np.cumsum(bad)
        base = dict(self.run)
        self.run["worst"] = _worst(base["worst"] + worst)
        pos = 0
        while pos < len(tokens):
            if self.file is None:
                self.file = open(os.path.join(self.directory, shard_name(self.split, len(self.state["shards"])))
                                 + ".partial", "wb")
            piece = tokens[pos: pos + self.shard_tokens - self.filled]
            self.file.write(piece.tobytes())
            self.run["max_token_id"] = max(self.run["max_token_id"], int(piece.max()))
            pos += len(piece)
            self.filled += len(piece)
            if self.filled == self.shard_tokens:
                whole = int(np.searchsorted(ends, pos, "right"))  # documents of the chunk wholly written
                skip = 0 if whole == len(lengths) else pos - (int(ends[whole - 1]) if whole else 0) + \
                    (skip0 if whole == 0 else 0)
                self._finish(base["docs"] + whole, skip, base["bytes"] + (int(cum_bytes[whole - 1]) if whole else 0),
                             base["undecodable"] + (int(cum_bad[whole - 1]) if whole else 0))
        self.run.update(docs=base["docs"] + len(lengths), bytes=base["bytes"] + int(cum_bytes[-1]),
                        undecodable=base["undecodable"] + int(cum_bad[-1]))

    def _finish(self, docs: int, skip: int, nbytes: int, bad: int) -> None:
        self.file.close()
        name = shard_name(self.split, len(self.state["shards"]))
        os.replace(os.path.join(self.directory, name + ".partial"), os.path.join(self.directory, name))
        self.state["shards"].append(self.filled)
        self.state.update(docs=docs, skip=skip, bytes=nbytes, undecodable=bad, worst=self.run["worst"],
                          max_token_id=self.run["max_token_id"])
        self.file, self.filled = None, 0
        self.save()

    def close(self) -> None:
        """The split's last shard (shorter), and the state of every document."""
        if self.file is not None:
            self._finish(self.run["docs"], 0, self.run["bytes"], self.run["undecodable"])
        self.state.update(docs=self.run["docs"], skip=0, bytes=self.run["bytes"], undecodable=self.run["undecodable"],
                          worst=self.run["worst"], max_token_id=self.run["max_token_id"])


# ---------------------------------------------------------------------- building
def _chunks(docs: Iterable, is_val: Callable[[str], bool], states: dict, bar) -> Iterator[list]:
    """Chunks of (split, id, text, skip) of the documents not yet in finished shards, in corpus order."""
    seen = {s: 0 for s in SPLITS}
    chunk, size = [], 0
    for doc in docs:
        split = "val" if is_val(doc.id) else "train"
        n, done = seen[split], states[split]["docs"]
        seen[split] += 1
        if n < done:
            bar.update(1)
            continue
        chunk.append((split, doc.id, doc.data, states[split]["skip"] if n == done else 0))
        size += len(doc.data)
        if size >= CHUNK_BYTES or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _results(chunks: Iterator[list], tokenizer, dtype: np.dtype, workers: int) -> Iterator[dict]:
    """Tokenized chunks in order: in this process (workers=1, or a corpus of one chunk: no pool to start), or
    in a pool of `workers` processes with two chunks a worker in flight."""
    first = next(chunks, None)
    second = next(chunks, None) if first is not None else None
    chunks = itertools.chain([c for c in (first, second) if c is not None], chunks)
    if workers <= 1 or second is None:
        for chunk in chunks:
            yield _tokenize(chunk, tokenizer, dtype.name)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold JAX's threads
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer, dtype.name)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_tokenize, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def build(directory: str, docs: Callable[[], Iterable], is_val: Callable[[str], bool], tokenizer, meta: dict,
          shard_tokens: int, workers: int, log=print) -> dict:
    """Tokenize `docs()` (Document objects, in a fixed order; `is_val(id)` holds for validation documents) into
    shards in the local `directory`; returns the header. `meta` (corpus, text_field, val_fraction, fingerprint)
    goes into the header; a progress file of the same meta, tokenizer and shard size is resumed, another one
    discarded."""
    from tqdm.auto import tqdm

    if shard_tokens <= 0:
        raise ConfigError("data.shard_tokens", f"must be a positive integer, got {shard_tokens}")
    dtype = dtype_for(tokenizer.vocab_size)
    made_by = {"name": tokenizer.name, "hash": tokenizer.hash, "vocab_size": tokenizer.vocab_size}
    key = {"version": VERSION, **meta, "tokenizer": made_by, "dtype": dtype.name, "shard_tokens": shard_tokens}
    progress_path = os.path.join(directory, "progress.json")
    states = _progress(directory, key, log)

    def save() -> None:
        atomic_write_json(progress_path, {"key": key, "splits": states})

    writers = {s: _Writer(directory, s, dtype, shard_tokens, states[s], save) for s in SPLITS}
    bar = tqdm(unit="doc", unit_scale=True, disable=None, file=sys.stderr, desc="tokenizing", dynamic_ncols=True)
    with bar:
        chunks = _chunks(docs(), is_val, states, bar)
        for result in _results(chunks, tokenizer, dtype, workers):
            for split, parts in result.items():
                writers[split].write(*parts)
                bar.update(len(parts[1]))
            bar.set_postfix_str(f"{sum(w.tokens for w in writers.values()):,} tokens", refresh=False)
    for w in writers.values():
        w.close()
    save()
    corpus = meta["corpus"]
    total = sum(states[s]["bytes"] for s in SPLITS)
    if not total:
        raise ConfigError("data.corpus", f"{corpus} is empty")
    check_text(corpus, total, sum(states[s]["undecodable"] for s in SPLITS), states["train"]["worst"] +
               states["val"]["worst"])
    counts = {s: {"documents": states[s]["docs"], "bytes": states[s]["bytes"], "tokens": sum(states[s]["shards"])}
              for s in SPLITS}
    if not counts["train"]["tokens"] or not counts["val"]["tokens"]:
        counts = _tail_as_validation(directory, states, dtype, shard_tokens, meta["val_fraction"], total)
        log(f"{corpus} has too few documents to split by document; the last {counts['val']['tokens']} tokens are "
            "the validation split")
    header = {**key, "max_token_id": max(states[s]["max_token_id"] for s in SPLITS), "counts": counts,
              "shards": {s: [{"name": shard_name(s, k), "tokens": n} for k, n in enumerate(states[s]["shards"])]
                         for s in SPLITS}}
    atomic_write_json(os.path.join(directory, "header.json"), header)  # written last: the shards are complete
    os.remove(progress_path)
    return header


def _progress(directory: str, key: dict, log) -> dict:
    """Each split's state: that of the progress file when it was made for `key`; else fresh (old shards gone)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "progress.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            states = saved["splits"]
            log(f"resuming the token shards in {directory}: " + ", ".join(
                f"{len(states[s]['shards'])} {s} shards" for s in SPLITS) + " already done")
            return states
    for stale in glob.glob(os.path.join(directory, "*-[0-9][0-9][0-9][0-9][0-9].bin*")):
        os.remove(stale)
    return {s: _fresh_state() for s in SPLITS}


def _tail_as_validation(directory: str, states: dict, dtype: np.dtype, shard_tokens: int, val_fraction: float,
                        total_bytes: int) -> dict:
    """Too few documents for both splits: the one split's token stream, its tail cut off as validation."""
    if not states["train"]["shards"]:  # every document fell to validation: its shards become the train split's
        for k in range(len(states["val"]["shards"])):
            os.replace(os.path.join(directory, shard_name("val", k)), os.path.join(directory, shard_name("train", k)))
        states["train"], states["val"] = states["val"], _fresh_state()
    lengths = states["train"]["shards"]
    total = sum(lengths)
    cut = total - max(1, int(total * val_fraction))
    stream = TokenStream([np.memmap(os.path.join(directory, shard_name("train", k)), dtype=dtype, mode="r",
                                    shape=(n,)) for k, n in enumerate(lengths)], dtype)
    val = []
    for k, start in enumerate(range(cut, total, shard_tokens)):
        piece = stream[start: min(start + shard_tokens, total)]
        atomic_write_bytes(os.path.join(directory, shard_name("val", k)), piece.tobytes())
        val.append(len(piece))
    del stream
    keep = [min(n, max(0, cut - k * shard_tokens)) for k, n in enumerate(lengths)]
    for k, n in enumerate(keep):
        path = os.path.join(directory, shard_name("train", k))
        if n == 0:
            os.remove(path)
        elif n < lengths[k]:
            os.truncate(path, n * dtype.itemsize)
    states["train"]["shards"], states["val"]["shards"] = [n for n in keep if n], val
    return {s: {"documents": 0, "bytes": total_bytes * sum(states[s]["shards"]) / total,
                "tokens": sum(states[s]["shards"])} for s in SPLITS}
