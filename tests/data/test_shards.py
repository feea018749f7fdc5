"""Token shards: fixed-size files that hold, token for token, what a single-process encode with `tokenizers` itself
gives; the same bytes whatever the number of workers; a build stopped midway goes on without redoing finished
shards; TokenStream reads across shard files as the concatenation does."""

import json
import os

import numpy as np
import pytest
from ml_collections import ConfigDict
from tokenizers import Tokenizer

from scalax.data import corpora, shards
from tests.data.test_tokenizer_file import make_tokenizer_json

VAL_FRACTION = 0.2


def test_token_stream_reads_like_the_concatenation():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 60_000, n).astype(np.uint16) for n in (7, 0, 1, 30, 2, 0, 19)]
    whole = np.concatenate(parts)
    stream = shards.TokenStream(parts, np.uint16)
    assert len(stream) == len(whole) == 59
    for a, b in [(0, 59), (5, 9), (6, 8), (7, 8), (0, 0), (40, 100), (-10, -2), (58, 59), (3, 3)] + \
            [tuple(sorted(rng.integers(0, 60, 2))) for _ in range(50)]:
        np.testing.assert_array_equal(stream[a:b], whole[a:b])
    assert [stream[i] for i in range(-59, 59)] == list(whole[-59:]) + list(whole)
    np.testing.assert_array_equal(np.asarray(stream), whole)
    with pytest.raises(IndexError):
        stream[59]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(60):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: " + "héllo wörld, the quick brown fox. " * (i % 9 + 1)
                                              + "日本語 " * (i % 4))
    return root


@pytest.fixture
def tokenizer_file(tmp_path, corpus):
    return make_tokenizer_json(tmp_path / "tok" / "tokenizer.json", [p.read_text() for p in corpus.iterdir()])


def data_config(corpus, cache_dir, tokenizer, shard_tokens) -> ConfigDict:
    return ConfigDict(dict(corpus=str(corpus), text_field="text", tokenizer=str(tokenizer), bpe_vocab_size=300,
                           val_fraction=VAL_FRACTION, cache_dir=str(cache_dir), shard_tokens=shard_tokens))


def reference_streams(corpus, tokenizer_file) -> dict[str, np.ndarray]:
    """Each split's documents encoded one by one by `tokenizers` itself, each followed by end-of-text."""
    tok = Tokenizer.from_file(str(tokenizer_file))
    eos = tok.token_to_id("<|end_of_text|>")
    docs = corpora.split_documents(str(corpus), "text", VAL_FRACTION)
    return {s: np.asarray([t for d in docs[s] for t in [*tok.encode(d.data.decode(), add_special_tokens=False).ids,
                                                        eos]]) for s in shards.SPLITS}


def shard_bytes(directory) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory)) if n.endswith(".bin")}


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_are_fixed_size_and_hold_a_single_process_encode(tmp_path, corpus, tokenizer_file, workers,
                                                                 monkeypatch):
    monkeypatch.setattr(shards, "CHUNK_DOCS", 7)  # several chunks, so that two workers share them
    cfg = data_config(corpus, tmp_path / f"cache{workers}", tokenizer_file, shard_tokens=150)
    splits = corpora.load_splits(cfg, lambda m: None, workers=workers)
    reference = reference_streams(corpus, tokenizer_file)
    directory = tmp_path / f"cache{workers}" / os.listdir(tmp_path / f"cache{workers}")[0]
    header = json.loads((directory / "header.json").read_text())
    docs = corpora.split_documents(str(corpus), "text", VAL_FRACTION)
    for split in shards.SPLITS:
        sizes = [s["tokens"] for s in header["shards"][split]]
        assert len(sizes) > 2 and set(sizes[:-1]) == {150} and 0 < sizes[-1] <= 150
        files = [np.fromfile(directory / s["name"], np.uint16) for s in header["shards"][split]]
        assert [len(f) for f in files] == sizes
        np.testing.assert_array_equal(np.concatenate(files), reference[split])
        np.testing.assert_array_equal(np.asarray(getattr(splits, split)), reference[split])
        assert header["counts"][split] == {"documents": len(docs[split]), "tokens": len(reference[split]),
                                           "bytes": sum(len(d.data) for d in docs[split])}
    assert header["max_token_id"] == max(reference["train"].max(), reference["val"].max())
    assert "progress.json" not in os.listdir(directory)
    if workers == 2:  # byte for byte what one worker wrote
        one = tmp_path / "cache1"
        corpora.load_splits(data_config(corpus, one, tokenizer_file, 150), lambda m: None, workers=1)
        assert shard_bytes(directory) == shard_bytes(one / os.listdir(one)[0])


def test_a_build_stopped_midway_goes_on_without_redoing_finished_shards(tmp_path, corpus, tokenizer_file,
                                                                        monkeypatch):
    monkeypatch.setattr(shards, "CHUNK_DOCS", 3)
    tokenized = []
    tokenize = shards._tokenize
    monkeypatch.setattr(shards, "_tokenize", lambda chunk, *a: tokenized.extend(chunk) or tokenize(chunk, *a))
    tok = corpora.load_tokenizer(data_config(corpus, tmp_path, tokenizer_file, 0))
    meta = {"corpus": str(corpus), "text_field": "text", "val_fraction": VAL_FRACTION, "fingerprint": "f"}

    def build(directory, stop_after=None):
        def docs():
            for i, doc in enumerate(corpora.documents(str(corpus))):
                if i == stop_after:
                    raise KeyboardInterrupt  # as a kill would stop it: mid-shard
                yield doc
        log = []
        header = shards.build(str(directory), docs, lambda d: corpora.is_validation(d, VAL_FRACTION), tok, meta,
                              shard_tokens=230, workers=1, log=log.append)
        return header, log

    whole, _ = build(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "resumed", stop_after=41)
    progress = json.loads((tmp_path / "resumed" / "progress.json").read_text())["splits"]
    finished = {shards.shard_name(s, k) for s in shards.SPLITS for k in range(len(progress[s]["shards"]))}
    assert len(finished) >= 4 and any(progress[s]["skip"] for s in shards.SPLITS)  # a document split over shards
    stamps = {n: os.stat(tmp_path / "resumed" / n) for n in finished}
    tokenized.clear()
    header, log = build(tmp_path / "resumed")
    assert header == whole
    assert shard_bytes(tmp_path / "resumed") == shard_bytes(tmp_path / "whole")
    assert any("resuming" in line for line in log), log
    for name, st in stamps.items():  # the finished shards were left alone
        now = os.stat(tmp_path / "resumed" / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    # what the second build tokenized: the documents not wholly in finished shards, no more
    assert len(tokenized) == 60 - sum(progress[s]["docs"] for s in shards.SPLITS)


def test_a_single_document_over_many_shards_keeps_its_tail_as_validation(tmp_path, tokenizer_file):
    text = tmp_path / "one.txt"
    text.write_text("héllo wörld, the quick brown fox. 日本語 " * 300)
    cfg = data_config(text, tmp_path / "cache", tokenizer_file, shard_tokens=128)
    splits = corpora.load_splits(cfg, lambda m: None)
    tok = Tokenizer.from_file(str(tokenizer_file))
    joined = [*tok.encode(text.read_text(), add_special_tokens=False).ids, tok.token_to_id("<|end_of_text|>")]
    cut = len(joined) - max(1, int(len(joined) * VAL_FRACTION))
    np.testing.assert_array_equal(np.asarray(splits.train), joined[:cut])
    np.testing.assert_array_equal(np.asarray(splits.val), joined[cut:])
    for split in shards.SPLITS:
        sizes = [s["tokens"] for s in splits.header["shards"][split]]
        assert set(sizes[:-1]) <= {128} and sum(sizes) == len(getattr(splits, split))
