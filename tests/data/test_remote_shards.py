"""Token shards on a bucket (a local GCS emulator): read by window through a bounded block cache, the same tokens as
the files themselves, without downloading them whole; a shard directory on gs:// is a pre-tokenized corpus."""

import os

import numpy as np
from ml_collections import ConfigDict

from scalax import io
from scalax.data import corpora, shards


def test_remote_shards_read_by_window_through_a_bounded_cache(bucket):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 65_536, n).astype(np.uint16) for n in (300_000, 123_457)]
    for k, a in enumerate(arrays):
        io.atomic_write_bytes(f"{bucket}/s/train-{k:05d}.bin", a.tobytes())
    cache = shards.BlockCache(capacity=8 * 4096, block=4096)
    stream = shards.TokenStream([shards.RemoteShard(f"{bucket}/s/train-{k:05d}.bin", np.uint16, len(a), cache)
                                 for k, a in enumerate(arrays)], np.uint16)
    whole = np.concatenate(arrays)
    asked = 0
    windows = [(s, s + 257) for s in rng.integers(0, len(whole) - 257, 60)] + [(299_990, 300_010), (0, 1)]
    for a, b in windows + windows[:5]:  # the last five again: from the cache
        np.testing.assert_array_equal(stream[a:b], whole[a:b])
        asked += (b - a) * 2
        assert len(cache.blocks) * cache.block <= cache.capacity
    assert stream[len(whole) - 1] == whole[-1]
    # one window's bytes and at most two partial blocks per read: far from the 847 kB of the files
    assert cache.fetched <= asked + (len(windows) + 1) * 2 * cache.block
    assert cache.fetched < whole.nbytes / 2


def test_a_shard_directory_on_a_bucket_is_a_pretokenized_corpus(bucket, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i}: " + "héllo wörld, the quick brown fox. " * (i + 1))
    cfg = ConfigDict(dict(corpus=str(corpus), text_field="text", tokenizer="byte", bpe_vocab_size=300,
                          val_fraction=0.2, cache_dir=str(tmp_path / "cache"), shard_tokens=1000))
    local = corpora.load_splits(cfg, lambda m: None)
    directory = corpora.cache_dir_for(cfg)
    for name in [*shards.shard_files(local.header), "header.json"]:
        io.upload(os.path.join(directory, name), f"{bucket}/tokens/{name}")
    monkeypatch.setattr(shards, "CACHE", shards.BlockCache(capacity=1 << 20, block=1024))
    remote = corpora.load_splits(ConfigDict({**cfg.to_dict(), "corpus": f"{bucket}/tokens"}), lambda m: None)
    assert remote.header == local.header and isinstance(remote.train.parts[0], shards.RemoteShard)
    for split in shards.SPLITS:
        np.testing.assert_array_equal(np.asarray(getattr(remote, split)), np.asarray(getattr(local, split)))


def test_a_cache_on_a_bucket_serves_machines_without_the_corpus(bucket, tmp_path, monkeypatch):
    """`scalax prepare` on the machine with the corpus; a TPU host without it reads the bucket's shards by window
    (its mirror holds no shard), and `scalax info` finds the cache current."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i}: " + "the quick brown fox. " * (i + 1))
    cfg = ConfigDict(dict(corpus=str(corpus), text_field="text", tokenizer="byte", bpe_vocab_size=300,
                          val_fraction=0.2, cache_dir=f"{bucket}/tokens", shard_tokens=1000))
    monkeypatch.setenv("SCALAX_CACHE", str(tmp_path / "machine-with-corpus"))
    built = corpora.load_splits(cfg, lambda m: None)
    expected = {s: np.asarray(getattr(built, s)) for s in shards.SPLITS}
    corpus.rename(tmp_path / "elsewhere")
    monkeypatch.setenv("SCALAX_CACHE", str(tmp_path / "tpu-host"))
    log = []
    served = corpora.load_splits(cfg, log.append)
    assert any("is not on this machine" in line for line in log), log
    assert served.header == built.header and isinstance(served.train.parts[0], shards.RemoteShard)
    for split in shards.SPLITS:
        np.testing.assert_array_equal(np.asarray(getattr(served, split)), expected[split])
    assert corpora.current_header(cfg) == built.header
    assert not [f for _, _, files in os.walk(tmp_path / "tpu-host") for f in files if f.endswith(".bin")]
