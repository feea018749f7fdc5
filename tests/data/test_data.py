"""Tokenizers, corpora, token caches and the grain pipeline."""

import json
import os

import grain
import numpy as np
import pytest
from ml_collections import ConfigDict

from scalax.data import corpora, pipeline
from scalax.data.tokenizers import BpeTokenizer, ByteTokenizer
from scalax.errors import ConfigError


def data_config(corpus, cache_dir, **changes) -> ConfigDict:
    cfg = dict(corpus=str(corpus), text_field="text", tokenizer="byte", bpe_vocab_size=300, val_fraction=0.2,
               cache_dir=str(cache_dir), prefetch=4)
    cfg.update(changes)
    return ConfigDict(cfg)


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(40):
        (root / ("sub" if i % 3 else "") / f"doc{i:02d}.txt").write_text(f"document {i}: " + "héllo wörld " * (i + 5))
    return root


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    data = "print('héllo')\n".encode()
    ids = tok.encode(data)
    assert list(ids) == list(data) and tok.decode(ids) == data.decode()
    assert tok.vocab_size == 260 and tok.eos_id == 258


def test_split_is_stable_and_by_document(text_dir):
    a = corpora.split_documents(str(text_dir), "text", 0.2)
    b = corpora.split_documents(str(text_dir), "text", 0.2)
    assert [d.id for d in a["val"]] == [d.id for d in b["val"]]
    assert a["val"] and a["train"]
    assert not {d.id for d in a["val"]} & {d.id for d in a["train"]}
    assert len(a["val"]) + len(a["train"]) == 40
    # the same document lands in the same split whatever else is in the corpus
    for doc in a["val"]:
        assert corpora.is_validation(doc.id, 0.2)


def test_token_cache_contents_and_reuse(text_dir, tmp_path):
    cfg = data_config(text_dir, tmp_path / "cache")
    messages = []
    splits = corpora.load_splits(cfg, messages.append)
    docs = corpora.split_documents(str(text_dir), "text", 0.2)
    want = b"".join(d.data + b"\x00" for d in docs["train"])  # \x00 marks where eos goes
    got = np.asarray(splits.train)
    eos = got == ByteTokenizer.eos_id
    assert eos.sum() == len(docs["train"])
    np.testing.assert_array_equal(np.where(eos, 0, got), np.frombuffer(want, np.uint8))
    assert splits.header["counts"]["val"]["bytes"] == sum(len(d.data) for d in docs["val"])
    assert splits.train.dtype == np.uint16
    assert any("tokenizing" in m for m in messages)
    messages.clear()
    again = corpora.load_splits(cfg, messages.append)  # reused: nothing rebuilt
    assert not messages and np.array_equal(again.train, splits.train)
    # a changed corpus is noticed
    (text_dir / "new.txt").write_text("a new document")
    corpora.load_splits(cfg, messages.append)
    assert any("out of date" in m for m in messages)


def test_cache_of_another_tokenizer_is_rebuilt(text_dir, tmp_path):
    byte_cfg = data_config(text_dir, tmp_path / "cache")
    corpora.load_splits(byte_cfg, lambda m: None)
    messages = []
    bpe = corpora.load_splits(data_config(text_dir, tmp_path / "cache", tokenizer="bpe"), messages.append)
    assert any("made by another tokenizer" in m and "rebuilding" in m for m in messages)
    assert bpe.header["tokenizer"]["name"] == "bpe"
    assert bpe.header["tokenizer"]["hash"] == bpe.tokenizer.hash
    assert len(bpe.train) < bpe.header["counts"]["train"]["bytes"]  # BPE merges bytes


def test_bpe_round_trip(text_dir):
    docs = [d.data for d in corpora.documents(str(text_dir))]
    tok = BpeTokenizer.train(docs, 300)
    assert tok.vocab_size <= 300
    text = "document 7: héllo wörld"
    ids = tok.encode(text.encode())
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())


def test_jsonl_corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"d{i}", "body": f"text {i} " * 20}) for i in range(30)) + "\n")
    docs = list(corpora.documents(str(path), "body"))
    assert [d.id for d in docs] == [f"d{i}" for i in range(30)]
    assert docs[3].data == ("text 3 " * 20).encode()
    with pytest.raises(ConfigError, match=r"data\.text_field"):
        list(corpora.documents(str(path), "text"))


def test_single_file_corpus_splits_by_token_tail(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("abcdefghij" * 100)
    splits = corpora.load_splits(data_config(path, tmp_path / "cache", val_fraction=0.1), lambda m: None)
    stream = [*np.frombuffer(b"abcdefghij" * 100, np.uint8).tolist(), ByteTokenizer.eos_id]  # 1001 tokens
    assert len(splits.val) == 100  # int(1001 * 0.1): the tail
    np.testing.assert_array_equal(np.concatenate([splits.train, splits.val]), stream)


@pytest.mark.parametrize("make,match", [
    (lambda p: str(p / "missing"), "no such file"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "is empty"),
    (lambda p: (p / "e.txt").write_text("") or str(p / "e.txt"), "is empty"),
    (lambda p: str(p / "*.nothing"), "matches no files"),
])
def test_bad_corpus(tmp_path, make, match):
    with pytest.raises(ConfigError, match=match):
        corpora.load_splits(data_config(make(tmp_path), tmp_path / "cache"), lambda m: None)


def test_short_split_refused():
    with pytest.raises(ConfigError, match=r"train\.seq_len \+ 1 = 65"):
        pipeline.check_tokens(np.zeros(50, np.uint16), 64, 260, 10, "train")
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        pipeline.check_tokens(np.zeros(500, np.uint16), 64, 260, 300, "train")


def test_windows_cover_every_target_once():
    tokens = np.arange(103)
    w = pipeline.Windows(tokens, 10)
    assert len(w) == 10
    np.testing.assert_array_equal(w[3], np.arange(30, 41))
    targets = np.concatenate([w[i][1:] for i in range(len(w))])
    np.testing.assert_array_equal(targets, np.arange(1, 101))


@pytest.mark.parametrize("batch, count, seed", [(4, 1, 7), (8, 2, 1), (6, 3, 2**32 - 2)])
def test_batches_follow_grains_windowwise_shuffle(batch, count, seed):
    """The batch-at-a-time reader yields what grain's window-at-a-time chain would (the reference, built from grain's
    own shuffle, repeat, process slice and batch), in every epoch and for each process."""
    tokens = np.arange(1601)  # 100 windows of 16
    for p in range(count):
        reference = grain.MapDataset.source(pipeline.Windows(tokens, 16)).shuffle(seed=seed).repeat(None)
        reference = reference[p::count].batch(batch // count, drop_remainder=True)
        ours = pipeline.train_dataset(tokens, 16, batch, seed, p, count)
        for b in [*range(60), 10**6]:  # past the second epoch, and far out
            np.testing.assert_array_equal(ours[b], reference[b])
    windows = pipeline.Windows(tokens, 16)
    np.testing.assert_array_equal(windows.take([5, 0, 99]), np.stack([windows[5], windows[0], windows[99]]))


def test_shuffle_differs_per_epoch_and_batches_are_whole_windows():
    tokens = np.arange(1001)
    ds = pipeline.train_dataset(tokens, 10, 4, seed=0)  # 100 windows, 25 batches an epoch
    epoch0 = np.concatenate([ds[b][:, 0] // 10 for b in range(25)])
    epoch1 = np.concatenate([ds[b][:, 0] // 10 for b in range(25, 50)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(100))  # each window once an epoch
    assert not np.array_equal(epoch0, epoch1)
    assert np.all(np.diff(ds[0], axis=1) == 1)  # rows are contiguous windows


def test_process_slices_make_the_global_batch():
    tokens = np.arange(2001)
    whole = pipeline.train_dataset(tokens, 10, 8, seed=1)
    halves = [pipeline.train_dataset(tokens, 10, 8, seed=1, process_index=p, process_count=2) for p in (0, 1)]
    for b in range(5):
        rows = np.concatenate([h[b] for h in halves])
        assert sorted(map(tuple, rows)) == sorted(map(tuple, whole[b]))
        assert halves[0][b].shape == (4, 11)


@pytest.mark.parametrize("cpus,threads", [({0}, 1), ({0, 1}, 2), (set(range(8)), 2)])
def test_read_threads_follow_the_cpus_the_process_may_use(monkeypatch, cpus, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus, raising=False)
    assert pipeline.read_threads() == threads


def test_iterator_restored_mid_epoch_yields_the_same_batches():
    tokens = np.arange(5001)
    ds = pipeline.train_dataset(tokens, 16, 4, seed=7)  # 312 windows: 78 batches an epoch
    reference = pipeline.iterator(ds)
    expected = [next(reference) for _ in range(100)]  # into the second epoch
    it = pipeline.iterator(ds)
    for _ in range(37):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    restored = pipeline.iterator(ds)
    restored.set_state(state)
    for b in range(37, 100):
        np.testing.assert_array_equal(next(restored), expected[b])


@pytest.mark.parametrize("before, after", [(2, 1), (2, 4), (4, 2)])
def test_state_saved_by_some_processes_resumes_on_another_count(before, after):
    """The saved state is the global position: `before` processes save mid-epoch, `after` processes go on with
    the same global batches, and across the change each window is read exactly once per epoch."""
    tokens = np.arange(801)
    per_epoch, batch, stop, total = 80, 8, 13, 40  # 10 batches an epoch; save mid-way through the second

    def global_batches(count, state, steps):
        its = [pipeline.iterator(pipeline.train_dataset(tokens, 10, batch, 3, p, count), prefetch=2)
               for p in range(count)]
        for it in its:
            if state is not None:
                it.set_state(state)
        out = [sorted(np.concatenate([next(it)[:, 0] // 10 for it in its]).tolist()) for _ in range(steps)]
        return out, [json.loads(json.dumps(it.get_state())) for it in its]

    reference, _ = global_batches(1, None, total)
    first, states = global_batches(before, None, stop)
    assert all(state == states[0] for state in states)  # every process saves the same state
    second, _ = global_batches(after, states[0], total - stop)
    assert first + second == reference
    windows = np.concatenate(first + second)
    for epoch in windows.reshape(-1, per_epoch):
        assert sorted(epoch) == list(range(per_epoch))


def test_eval_windows_are_fixed(tmp_path):
    tokens = np.arange(10_001)
    a = pipeline.eval_windows(tokens, 100, 8)
    assert a.shape == (8, 101)
    np.testing.assert_array_equal(a, pipeline.eval_windows(tokens, 100, 8))
    assert a[0, 0] == 0 and a[-1, 0] == 9900


def test_cache_files_written_atomically(text_dir, tmp_path):
    cfg = data_config(text_dir, tmp_path / "cache")
    corpora.load_splits(cfg, lambda m: None)
    names = os.listdir(corpora.cache_dir_for(cfg))
    # no temporary files left behind (the lock file stays: processes of this machine take it to build the cache once)
    assert sorted(names) == [".lock", "header.json", "train-00000.bin", "val-00000.bin"]
