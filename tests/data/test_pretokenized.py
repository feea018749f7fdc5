"""Pre-tokenized corpora, read as they are: nanoGPT-style .bin token files and a token cache made elsewhere give
the same token streams, bits per byte and training losses as the text they were made from."""

import json
import os

import numpy as np
import pytest
from ml_collections import ConfigDict

from scalax.data import corpora
from scalax.errors import ConfigError
from tests.test_user_errors import run_cli


def data_config(corpus, cache_dir, **changes) -> ConfigDict:
    cfg = dict(corpus=str(corpus), text_field="text", tokenizer="byte", bpe_vocab_size=300, val_fraction=0.2,
               cache_dir=str(cache_dir), prefetch=4, token_dtype="", vocab_multiple=1)
    cfg.update(changes)
    return ConfigDict(cfg)


@pytest.fixture
def text_corpus(tmp_path):
    root = tmp_path / "text"
    root.mkdir()
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: " + "héllo wörld, the quick fox " * (i + 5))
    return root


@pytest.fixture
def nanogpt_dir(tmp_path, text_corpus):
    """train.bin and val.bin written from the text's own token streams, as nanoGPT's prepare.py writes them."""
    splits = corpora.load_splits(data_config(text_corpus, tmp_path / "cache"), lambda m: None)
    root = tmp_path / "nanogpt"
    root.mkdir()
    for name, stream in (("train", splits.train), ("val", splits.val)):
        np.asarray(stream, np.uint16).tofile(root / f"{name}.bin")
    return root, splits


def test_bin_files_and_a_cache_read_as_the_text_tokenizes(tmp_path, text_corpus, nanogpt_dir):
    root, text = nanogpt_dir
    for corpus, changes in ((root, {"token_dtype": "uint16"}),
                            (corpora.cache_dir_for(data_config(text_corpus, tmp_path / "cache")), {})):
        splits = corpora.load_splits(data_config(corpus, tmp_path / "unused", **changes), lambda m: None)
        assert np.array_equal(splits.train, text.train) and np.array_equal(splits.val, text.val)
        assert splits.bytes_per_token("val") == text.bytes_per_token("val")  # bits per byte compare
        assert splits.header["max_token_id"] == text.header["max_token_id"]
    assert not os.path.exists(tmp_path / "unused")  # nothing tokenized, no cache made
    # one .bin: its tail is validation (data.val_fraction of it)
    whole = np.concatenate([text.train, text.val]).astype(np.uint32)
    whole.tofile(tmp_path / "all.bin")
    one = corpora.load_splits(data_config(tmp_path / "all.bin", tmp_path, token_dtype="uint32", val_fraction=0.1),
                              lambda m: None)
    cut = len(whole) - int(len(whole) * 0.1)
    assert np.array_equal(one.train, whole[:cut]) and np.array_equal(one.val, whole[cut:])
    # byte tokens that are not UTF-8 (every value 0..255): still one byte each
    np.tile(np.arange(256, dtype=np.uint16), 40).tofile(tmp_path / "bytes.bin")
    raw = corpora.load_splits(data_config(tmp_path / "bytes.bin", tmp_path, token_dtype="uint16"), lambda m: None)
    assert raw.bytes_per_token("val") == 1.0


def test_mistakes_are_one_line(tmp_path, text_corpus, nanogpt_dir):
    root, _ = nanogpt_dir
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    cases = [(data_config(root, tmp_path), "data.token_dtype", "uint16"),
             (data_config(tmp_path / "odd.bin", tmp_path, token_dtype="uint16"), "data.token_dtype", "3 bytes"),
             (data_config(root, tmp_path, token_dtype="uint16", tokenizer="bpe"), "data.tokenizer", "name the")]
    for cfg, key, hint in cases:
        with pytest.raises(ConfigError, match=hint) as e:
            corpora.load_splits(cfg, lambda m: None)
        assert e.value.key == key
    # a cache made by another tokenizer
    from tests.data.test_tokenizer_file import make_tokenizer_json

    other = make_tokenizer_json(tmp_path / "tok.json", ["abc def ghi"] * 5, vocab=300)
    cache = corpora.cache_dir_for(data_config(text_corpus, tmp_path / "cache"))
    with pytest.raises(ConfigError, match="was tokenized by byte") as e:
        corpora.load_splits(data_config(cache, tmp_path, tokenizer=str(other)), lambda m: None)
    assert e.value.key == "data.tokenizer"


@pytest.mark.slow
def test_training_from_bin_files_equals_training_from_text(tmp_path, text_corpus, nanogpt_dir, capsys):
    root, _ = nanogpt_dir
    common = ["train", "--config=configs/llama.py:size=tiny", "--config.train.steps=12",
              "--config.train.batch_size=8", "--config.train.seq_len=32", "--config.train.eval_windows=8",
              "--config.train.log_every=3", "--config.optim.warmup_steps=1"]
    runs = {}
    for name, data in (("text", [f"--config.data.corpus={text_corpus}", "--config.data.val_fraction=0.2",
                                 f"--config.data.cache_dir={tmp_path / 'cache'}"]),
                       ("bin", [f"--config.data.corpus={root}", "--config.data.token_dtype=uint16"])):
        rc, _, err = run_cli(capsys, *common, f"--workdir={tmp_path / name}", *data)
        assert rc == 0, err
        with open(tmp_path / name / "metrics.jsonl") as f:
            runs[name] = [json.loads(line) for line in f]
    losses = {k: [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("eval_bpb")) for r in v]
              for k, v in runs.items()}
    assert losses["bin"] == losses["text"] and len(losses["text"]) >= 4
