"""Corpora and token caches.

A corpus is `stdlib` (the running interpreter's Python standard library: every `.py` file under
`sysconfig.get_paths()["stdlib"]` outside site-packages, sorted; the same everywhere for one Python version), a
text file, a directory (every file below it, sorted), a glob, or a table of documents, one per row, its
`data.text_field`: JSONL (plain, gzip or zstd), Parquet, Arrow, or a `datasets` directory saved to disk.
Documents go to the validation split when a stable hash of their id falls below `data.val_fraction`; a corpus
too small for that (one file, say) has its token stream's tail as validation.

Pre-tokenized corpora, read as they are (no tokenizing): a scalax token cache directory (`scalax prepare`'s
output elsewhere: header.json and its shards), or nanoGPT-style flat token files: one `.bin` (its tail
becomes validation) or a directory with `train.bin` and `val.bin`, of `data.token_dtype` (uint16 or uint32).

Token caches: both splits tokenized once, streaming and in parallel, into fixed-size shard files with an index
(shards.py: tokenizer hash, corpus fingerprint, counts), resumable after a kill and reused while the corpus and
tokenizer are unchanged; read back memory-mapped. A `gs://` cache_dir is built in a local mirror
(io.local_mirror) and uploaded, its header last (a header on the bucket means a complete cache); a complete one
on the bucket is read there, by window (shards.RemoteShard), never downloaded whole, also by machines that lack
the corpus.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator

import numpy as np

from scalax import io
from scalax.data import shards
from scalax.data.tokenizers import BpeTokenizer, ByteTokenizer, bpe_path, check_name, is_file, load_file
from scalax.errors import ConfigError
from scalax.io import atomic_write_bytes

SPLITS = shards.SPLITS
# Files that hold no text: read as text they would train silently on bytes of another format.
BINARY_SUFFIXES = (".bin", ".npy", ".npz", ".parquet", ".arrow", ".gz", ".zst", ".bz2", ".xz", ".zip", ".tar",
                   ".safetensors", ".pt", ".pkl")


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class TokenSplits:
    """Token streams of both splits (memory-mapped) and the cache header."""

    train: np.ndarray
    val: np.ndarray
    header: dict
    tokenizer: ByteTokenizer | BpeTokenizer

    def bytes_per_token(self, split: str = "val") -> float:
        counts = self.header["counts"][split]
        return counts["bytes"] / counts["tokens"]


# ---------------------------------------------------------------------- listing documents
def _stdlib_files() -> list[tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return [(os.path.relpath(f, root), f) for f in sorted(files)]


def _corpus_files(corpus: str) -> list[tuple[str, str]]:
    """(document id, path) pairs of a corpus spec, sorted."""
    if corpus == "stdlib":
        return _stdlib_files()
    if any(c in corpus for c in "*?["):
        paths = sorted(p for p in glob.glob(corpus, recursive=True) if os.path.isfile(p))
        if not paths:
            raise ConfigError("data.corpus", f"the glob {corpus!r} matches no files")
        return [(p, p) for p in paths]
    if os.path.isdir(corpus):
        paths = []
        for dirpath, dirnames, filenames in os.walk(corpus):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if "state.json" in filenames and any(f.endswith(".arrow") for f in filenames):
                filenames = [f for f in filenames if f.endswith(".arrow")]  # a `datasets` save_to_disk directory
            paths += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
        return [(os.path.relpath(p, corpus), p) for p in sorted(paths)]
    if os.path.isfile(corpus):
        return [(os.path.basename(corpus), corpus)]
    raise ConfigError("data.corpus", f"no such file or directory: {corpus} (allowed: 'stdlib', a file, a "
                      "directory, a glob, or a .jsonl file)")


def fingerprint(corpus: str, text_field: str) -> str:
    """Changes when the corpus's files change (names, sizes, modification times) or its Python version."""
    h = hashlib.sha256(f"{corpus}\n{text_field}\n".encode())
    if corpus == "stdlib":
        h.update(f"python {sys.version_info[:3]}\n".encode())
    for doc_id, path in _corpus_files(corpus):
        st = os.stat(path)
        h.update(f"{doc_id}\0{st.st_size}\0{'' if corpus == 'stdlib' else st.st_mtime_ns}\n".encode())
    return h.hexdigest()


TABLE_SUFFIXES = (".parquet", ".arrow")  # a column of text per row (pyarrow: pip install 'scalax-lm[data]')
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


def documents(corpus: str, text_field: str = "text") -> Iterator[Document]:
    """The corpus's documents in a fixed order: a text file is one; a JSONL line (plain, gzip or zstd), a Parquet
    or Arrow row (a `datasets` directory saved to disk is its .arrow files) is one, its `text_field`."""
    for doc_id, path in _corpus_files(corpus):
        lower = path.lower()
        if lower.endswith(JSONL_SUFFIXES):
            yield from _jsonl_documents(doc_id, path, text_field)
        elif lower.endswith(TABLE_SUFFIXES):
            yield from _table_documents(doc_id, path, text_field)
        elif lower.endswith(BINARY_SUFFIXES):
            what = ("a token file (name the .bin itself, or a directory of train.bin and val.bin, as data.corpus)"
                    if path.endswith(".bin") else "not a text file")
            raise ConfigError("data.corpus", f"{path} is {what}; allowed: text files, directories or globs of them, "
                              f"{', '.join(JSONL_SUFFIXES + TABLE_SUFFIXES)}")
        else:
            with open(path, "rb") as f:
                yield Document(doc_id, f.read())


def _open_jsonl(path: str):
    """A binary file object over the lines of a JSONL file, decompressing gzip or zstd as it reads."""
    if path.lower().endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if path.lower().endswith(".zst"):
        import io as std_io

        try:
            import zstandard
        except ImportError:
            raise ConfigError("data.corpus", f"{path} is zstd-compressed: pip install 'scalax-lm[data]' (zstandard) "
                              "to read it") from None
        return std_io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _jsonl_documents(doc_id: str, path: str, text_field: str) -> Iterator[Document]:
    try:
        with _open_jsonl(path) as lines:
            for line_no, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record[text_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError("data.text_field", f"{path}:{line_no} is not a JSON object with a "
                                      f"{text_field!r} field") from None
                yield Document(str(record.get("id", f"{doc_id}:{line_no}")), str(text).encode("utf-8"))
    except ConfigError:
        raise
    except Exception as e:  # a damaged gzip or zstd stream (OSError, EOFError, zstandard.ZstdError)
        raise ConfigError("data.corpus", f"{path} cannot be read: {str(e).strip()[:200]}") from None


def _table_documents(doc_id: str, path: str, text_field: str) -> Iterator[Document]:
    """Rows of a Parquet file or an Arrow file (IPC stream, as `datasets` saves, or file format), read in
    record batches so that memory stays bounded."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("data.corpus", f"{path} is a table: pip install 'scalax-lm[data]' (pyarrow) to read "
                          "it") from None
    try:
        if path.lower().endswith(".parquet"):
            source = pq.ParquetFile(path)
            schema, batches = source.schema_arrow, source.iter_batches(batch_size=1024)
        else:
            try:
                reader = pa.ipc.open_stream(pa.memory_map(path))
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(pa.memory_map(path))
            schema = reader.schema
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) \
                if hasattr(reader, "num_record_batches") else iter(reader)
    except (pa.ArrowException, OSError) as e:
        kind = "Parquet" if path.lower().endswith(".parquet") else "Arrow"
        raise ConfigError("data.corpus", f"{path} cannot be read as {kind}: "
                          f"{str(e).strip().splitlines()[0][:200]}") from None
    if text_field not in schema.names:
        raise ConfigError("data.text_field", f"{path} has no column {text_field!r}; its columns: "
                          f"{', '.join(schema.names[:10])}")
    row = 0
    try:
        for batch in batches:
            texts = batch.column(schema.names.index(text_field)).to_pylist()
            ids = batch.column(schema.names.index("id")).to_pylist() if "id" in schema.names else None
            for i, text in enumerate(texts):
                yield Document(str(ids[i]) if ids else f"{doc_id}:{row + i}", str(text or "").encode("utf-8"))
            row += len(texts)
    except (pa.ArrowException, OSError) as e:  # a damaged page or batch, found while reading
        raise ConfigError("data.corpus", f"{path}: row {row}: {str(e).strip().splitlines()[0][:200]}") from None


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Stable split: the first 8 bytes of sha256(id) as a fraction of 2^64, below val_fraction."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2.0**64
    return u < val_fraction


def split_documents(corpus: str, text_field: str, val_fraction: float) -> dict[str, list[Document]]:
    """Both splits' documents, in memory (a reference for tests; the cache is built streaming, shards.build)."""
    splits: dict[str, list[Document]] = {"train": [], "val": []}
    for doc in documents(corpus, text_field):
        splits["val" if is_validation(doc.id, val_fraction) else "train"].append(doc)
    return splits


def train_documents(corpus: str, text_field: str, val_fraction: float) -> Iterator[Document]:
    """The train split's documents, streamed (what a BPE trains on)."""
    return (doc for doc in documents(corpus, text_field) if not is_validation(doc.id, val_fraction))


# ---------------------------------------------------------------------- token caches
def cache_dir_for(data_cfg) -> str:
    text = f"{data_cfg.corpus}\n{data_cfg.text_field}\n{data_cfg.val_fraction}"
    if is_file(data_cfg.tokenizer):  # a cache per tokenizer file, so that switching files rebuilds nothing
        text += f"\n{load_file(data_cfg.tokenizer).hash}"
    key = hashlib.sha256(text.encode()).hexdigest()
    name = "stdlib" if data_cfg.corpus == "stdlib" else os.path.basename(data_cfg.corpus.rstrip("/*")) or "corpus"
    return io.join(os.path.expanduser(data_cfg.cache_dir), f"{name}-{key[:12]}")


def _local(directory: str) -> str:
    """The cache directory as a local one: `directory` itself, or a gs:// cache's local mirror, its trained BPE
    (tokenizer.json) brought up to date with the bucket's. Shards on the bucket are read there, by window."""
    if not io.is_remote(directory):
        return directory
    io.check_output_dir(directory, "data.cache_dir")
    local = io.local_mirror(directory)
    remote, here = io.join(directory, "tokenizer.json"), os.path.join(local, "tokenizer.json")
    if io.exists(remote):
        data = io.read_bytes(remote)
        if not os.path.isfile(here) or io.read_bytes(here) != data:
            atomic_write_bytes(here, data)
    return local


def _publish(local: str, directory: str, names: list[str]) -> None:
    """Upload a cache built in a gs:// cache's local mirror, in the order given (the header last)."""
    if local != directory:
        for name in names:
            io.upload(os.path.join(local, name), io.join(directory, name))


def load_tokenizer(data_cfg, log=print):
    """The configured tokenizer; a BPE is trained on the train split the first time (`scalax prepare`)."""
    check_name(data_cfg.tokenizer)
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    if is_file(data_cfg.tokenizer):
        return load_file(data_cfg.tokenizer)
    directory = cache_dir_for(data_cfg)
    local = _local(directory)
    path = bpe_path(local)
    if os.path.isfile(path):
        tok = BpeTokenizer.load(path)
        if tok.vocab_size <= data_cfg.bpe_vocab_size:
            return tok
        log(f"tokenizer {path} has {tok.vocab_size} tokens, more than data.bpe_vocab_size="
            f"{data_cfg.bpe_vocab_size}; training a new one")
    log(f"training a BPE tokenizer of {data_cfg.bpe_vocab_size} tokens on the train split of {data_cfg.corpus}")
    seen = {"bytes": 0, "bad": 0, "worst": []}

    def texts() -> Iterator[bytes]:  # streamed into the trainer, checked for text on the way
        for doc in train_documents(data_cfg.corpus, data_cfg.text_field, data_cfg.val_fraction):
            bad = shards.undecodable_bytes(doc.data)
            seen["bytes"] += len(doc.data)
            seen["bad"] += bad
            seen["worst"] = sorted(seen["worst"] + [[bad, doc.id]], reverse=True)[:3]
            yield doc.data

    tok = BpeTokenizer.train(texts(), data_cfg.bpe_vocab_size)
    if not seen["bytes"]:
        raise ConfigError("data.corpus", f"{data_cfg.corpus} is empty")
    shards.check_text(data_cfg.corpus, seen["bytes"], seen["bad"], seen["worst"])
    atomic_write_bytes(path, tok.to_str().encode())
    _publish(local, directory, [os.path.basename(path)])
    return tok


def _current(header: dict | None, fingerprint_now: str | None) -> bool:
    """A complete cache of this version, made from the corpus as it is now (None: the corpus is not here to
    compare: any fingerprint)."""
    return bool(header) and header.get("version") == shards.VERSION and \
        fingerprint_now in (None, header.get("fingerprint"))


def current_header(data_cfg) -> dict | None:
    """The token cache's header if the cache exists and is current for the corpus (None otherwise); reads no
    token stream and builds nothing (for `scalax info`)."""
    kind = pretokenized(data_cfg.corpus)
    if kind == "cache":
        return io.read_json(io.join(data_cfg.corpus, "header.json"))
    if kind == "bin":
        try:
            streams = _bin_streams(data_cfg)
        except ConfigError:
            return None
        return {"counts": {s: {"tokens": len(streams[s])} for s in SPLITS}}
    try:
        path = io.join(cache_dir_for(data_cfg), "header.json")
        if not io.exists(path):
            return None
        header = io.read_json(path)
    except (OSError, ValueError, ConfigError):
        return None
    try:
        now = fingerprint(data_cfg.corpus, data_cfg.text_field)
    except (OSError, ConfigError):  # the corpus is not here: a bucket's cache, built elsewhere, serves as it is
        if not io.is_remote(path):
            return None
        now = None
    return header if _current(header, now) else None


def epochs(header: dict, tokens: int) -> float:
    """Passes over the training split that `tokens` training tokens make."""
    return tokens / max(header["counts"]["train"]["tokens"], 1)


# ---------------------------------------------------------------------- pre-tokenized corpora
def pretokenized(corpus: str) -> str | None:
    """"cache" (scalax token shards, here or on a bucket), "bin" (nanoGPT-style token files) or None (text)."""
    if io.is_remote(corpus):
        return "cache" if io.exists(io.join(corpus, "header.json")) else None
    if corpus == "stdlib" or any(c in corpus for c in "*?[") or not os.path.exists(corpus):
        return None
    if os.path.isdir(corpus):
        if os.path.isfile(os.path.join(corpus, "header.json")):
            return "cache"
        has = [os.path.isfile(os.path.join(corpus, f"{s}.bin")) for s in SPLITS]
        return "bin" if all(has) else None
    return "bin" if corpus.endswith(".bin") else None


def _token_file(path: str, dtype: str) -> np.ndarray:
    size, itemsize = os.path.getsize(path), np.dtype(dtype).itemsize
    if size % itemsize:
        raise ConfigError("data.token_dtype", f"{path} has {size:,} bytes, not a whole number of {dtype} tokens "
                          f"({itemsize} bytes each); allowed: the dtype the file was written with (uint16, uint32)")
    return np.memmap(path, dtype=dtype, mode="r", shape=(size // itemsize,)) if size else np.zeros(0, dtype)


def _bin_streams(data_cfg) -> dict[str, np.ndarray]:
    """A nanoGPT-style corpus's train and val streams (memory-mapped)."""
    dtype = data_cfg.get("token_dtype", "")
    if dtype not in ("uint16", "uint32"):
        raise ConfigError("data.token_dtype", f"{data_cfg.corpus} holds token ids; say their dtype: uint16 "
                          f"(nanoGPT's GPT-2 files) or uint32 (got {dtype!r})")
    corpus = data_cfg.corpus
    if os.path.isdir(corpus):
        return {s: _token_file(os.path.join(corpus, f"{s}.bin"), dtype) for s in SPLITS}
    tokens = _token_file(corpus, dtype)
    cut = len(tokens) - max(1, int(len(tokens) * data_cfg.val_fraction))
    return {"train": tokens[:cut], "val": tokens[cut:]}


def _load_pretokenized(data_cfg, kind: str, log) -> TokenSplits:
    corpus = data_cfg.corpus
    if kind == "cache":
        header = io.read_json(io.join(corpus, "header.json"))
        if header.get("version") != shards.VERSION or "shards" not in header:
            raise ConfigError("data.corpus", f"{corpus} holds token shards of another format (version "
                              f"{header.get('version')}); allowed: version {shards.VERSION}: run `scalax prepare` on "
                              "the text corpus again")
        own_bpe = io.join(corpus, "tokenizer.json")
        tokenizer = (BpeTokenizer.load(own_bpe) if data_cfg.tokenizer == "bpe" and io.isfile(own_bpe)
                     else load_tokenizer(data_cfg, log))
        made_by = header.get("tokenizer", {})
        if made_by.get("hash") != tokenizer.hash:
            raise ConfigError("data.tokenizer", f"{corpus} was tokenized by {made_by.get('name')} (hash "
                              f"{made_by.get('hash', '')[:12]}), not by {tokenizer.name} (hash {tokenizer.hash[:12]});"
                              " allowed: the tokenizer that made it")
        return TokenSplits(*(shards.open_split(corpus, header, s) for s in SPLITS), header, tokenizer)
    if data_cfg.tokenizer == "bpe":
        raise ConfigError("data.tokenizer", f"{corpus} holds token ids: name the tokenizer that made them (byte, or "
                          "its tokenizer.json), not a BPE to train")
    tokenizer = load_tokenizer(data_cfg, log)
    streams = _bin_streams(data_cfg)
    # bits per byte need the bytes: those of the validation split, decoded; the training split's are estimated
    if isinstance(tokenizer, ByteTokenizer):  # a token below 256 is a byte, whether or not it is UTF-8
        val_bytes = int(np.count_nonzero(np.asarray(streams["val"]) < 256))
    else:
        val_bytes = len(tokenizer.decode(int(i) for i in streams["val"]).encode())
    per_token = val_bytes / max(len(streams["val"]), 1)
    counts = {s: {"documents": 0, "tokens": len(streams[s]),
                  "bytes": val_bytes if s == "val" else len(streams[s]) * per_token} for s in SPLITS}
    max_id = max((int(streams[s].max()) for s in SPLITS if len(streams[s])), default=0)
    header = {"version": shards.VERSION, "corpus": corpus, "pretokenized": "bin",
              "dtype": streams["train"].dtype.name,
              "tokenizer": {"name": tokenizer.name, "hash": tokenizer.hash, "vocab_size": tokenizer.vocab_size},
              "max_token_id": max_id, "counts": counts, "train_bytes_estimated": True}
    log(f"{corpus}: {counts['train']['tokens']:,} train and {counts['val']['tokens']:,} validation tokens "
        f"({streams['train'].dtype.name}), read as they are")
    return TokenSplits(streams["train"], streams["val"], header, tokenizer)


def load_splits(data_cfg, log=print, workers: int | None = None) -> TokenSplits:
    """Token streams of the train and validation splits: a pre-tokenized corpus as it is, or a text corpus's
    token shards (built when missing or out of date, by `workers` processes: default_workers)."""
    kind = pretokenized(data_cfg.corpus)
    if kind:
        return _load_pretokenized(data_cfg, kind, log)
    tokenizer = load_tokenizer(data_cfg, log)
    directory = cache_dir_for(data_cfg)
    local = _local(directory)
    try:
        current = fingerprint(data_cfg.corpus, data_cfg.text_field)
    except ConfigError:  # the corpus is not on this machine: a cache on a bucket, built elsewhere, may still serve
        if local == directory or not io.exists(io.join(directory, "header.json")):
            raise
        current = None
    if local != directory:  # a cache on a bucket, complete and current: read there by window (or here, if built here)
        remote = _read_header(directory, directory, current, tokenizer, lambda m: None)
        if remote is not None:
            if current is None:
                log(f"{data_cfg.corpus} is not on this machine: reading the token cache {directory} as it was built "
                    f"from it ({remote['counts']['train']['tokens']:,} train tokens)")
            here = _read_header(local, directory, current, tokenizer, lambda m: None)
            return TokenSplits(*(shards.open_split(local if here == remote else directory, remote, s)
                                 for s in SPLITS), remote, tokenizer)
        if current is None:
            raise ConfigError("data.corpus", f"{data_cfg.corpus} is not on this machine, and the token cache "
                              f"{directory} was made by another tokenizer or scalax version; allowed: the corpus here, "
                              f"or the cache as `scalax prepare` makes it for {tokenizer.name}")
    with shards.locked(local):  # another process of this machine may be building it: wait, then read its work
        header = _read_header(local, directory, current, tokenizer, log)
        if header is None:
            header = _build(data_cfg, tokenizer, directory, local, current, workers, log)
        else:  # built here before, its upload cut short
            _publish(local, directory, [*shards.shard_files(header), "header.json"])
    return TokenSplits(*(shards.open_split(local, header, s) for s in SPLITS), header, tokenizer)


def _read_header(local: str, directory: str, current: str, tokenizer, log) -> dict | None:
    """The header in `local` (a directory, or the bucket's) when the cache is complete and current for the
    corpus and tokenizer."""
    path = io.join(local, "header.json")
    if not io.exists(path):
        return None
    header = io.read_json(path)
    if not _current(header, current):
        log(f"token cache {directory} is out of date (the corpus changed, or an older scalax made it); rebuilding it")
        return None
    made_by = header.get("tokenizer", {})
    if made_by.get("hash") != tokenizer.hash:
        log(f"token cache {directory} was made by another tokenizer ({made_by.get('name')}, hash "
            f"{made_by.get('hash', '')[:12]}); rebuilding it for {tokenizer.name} (hash {tokenizer.hash[:12]})")
        return None
    return header


def _build(data_cfg, tokenizer, directory: str, local: str, current_fingerprint: str, workers: int | None,
           log) -> dict:
    """Tokenize both splits into shards in `local` (`directory`, or its mirror when that is on gs://, then
    uploaded, the header last)."""
    log(f"tokenizing {data_cfg.corpus} with the {tokenizer.name} tokenizer into {directory}")
    stale = os.path.join(local, "header.json")
    if os.path.isfile(stale):
        os.remove(stale)  # the old shards are no longer complete for anyone
    meta = {"corpus": data_cfg.corpus, "text_field": data_cfg.text_field, "val_fraction": data_cfg.val_fraction,
            "fingerprint": current_fingerprint}
    header = shards.build(local, lambda: documents(data_cfg.corpus, data_cfg.text_field),
                          lambda doc_id: is_validation(doc_id, data_cfg.val_fraction), tokenizer, meta,
                          data_cfg.get("shard_tokens", shards.SHARD_TOKENS), workers or default_workers(tokenizer), log)
    _publish(local, directory, [*shards.shard_files(header), "header.json"])
    return header


def available_cores() -> int:
    """The CPUs this process may use (its affinity set where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(tokenizer) -> int:
    """One per core; the byte tokenizer in this process (it encodes faster than worker processes can be handed
    the text: 111 against 73 MB/s on 2 cores, docs/benchmarks.md)."""
    return 1 if isinstance(tokenizer, ByteTokenizer) else available_cores()
