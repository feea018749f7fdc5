"""Corpora as JSONL (plain, gzip, zstd), Parquet, Arrow and `datasets` directories saved to disk: the same
documents, ids and token streams from each; their mistakes are one line."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from ml_collections import ConfigDict

from scalax.data import corpora
from scalax.errors import ConfigError

ROWS = [{"id": f"doc-{i}", "text": f"document {i}: " + "héllo wörld 🙂 " * (i % 7 + 1), "lang": "x"}
        for i in range(60)]


def data_config(corpus, cache_dir, **changes) -> ConfigDict:
    cfg = dict(corpus=str(corpus), text_field="text", tokenizer="byte", bpe_vocab_size=300, val_fraction=0.2,
               cache_dir=str(cache_dir), prefetch=4, token_dtype="", vocab_multiple=1)
    cfg.update(changes)
    return ConfigDict(cfg)


def write_all(root):
    """The same rows in every format; returns {format: path}."""
    root.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    (root / "plain.jsonl").write_bytes(lines)
    (root / "gz.jsonl.gz").write_bytes(gzip.compress(lines))
    (root / "zst.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    table = pa.table({k: [r[k] for r in ROWS] for k in ROWS[0]})
    pq.write_table(table, root / "t.parquet", row_group_size=16)  # several row groups
    with pa.OSFile(str(root / "t.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=25):
            writer.write_batch(batch)
    saved = root / "saved"  # the layout of datasets' save_to_disk: Arrow stream shards and two JSON files
    saved.mkdir()
    for k, part in enumerate((table.slice(0, 30), table.slice(30))):
        with pa.OSFile(str(saved / f"data-0000{k}-of-00002.arrow"), "wb") as sink, \
                pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
    (saved / "state.json").write_text(json.dumps({"_data_files": []}))
    (saved / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return {"jsonl": root / "plain.jsonl", "gzip": root / "gz.jsonl.gz", "zstd": root / "zst.jsonl.zst",
            "parquet": root / "t.parquet", "arrow": root / "t.arrow", "datasets": saved}


def test_every_format_gives_the_same_documents_and_tokens(tmp_path):
    paths = write_all(tmp_path / "formats")
    expected = [(r["id"], r["text"].encode()) for r in ROWS]
    reference = corpora.load_splits(data_config(paths["jsonl"], tmp_path / "cache"), lambda m: None)
    for name, path in paths.items():
        docs = [(d.id, d.data) for d in corpora.documents(str(path), "text")]
        assert docs == expected, name
        splits = corpora.load_splits(data_config(path, tmp_path / "cache"), lambda m: None)
        assert list(splits.train) == list(reference.train) and list(splits.val) == list(reference.val), name
        assert splits.header["counts"] == reference.header["counts"], name


def test_format_mistakes_are_one_line(tmp_path):
    paths = write_all(tmp_path / "formats")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b not gzip")
    cases = [(tmp_path / "bad.parquet", {}, "data.corpus", "cannot be read as Parquet"),
             (tmp_path / "bad.jsonl.gz", {}, "data.corpus", "cannot be read"),
             (paths["parquet"], {"text_field": "body"}, "data.text_field", "no column 'body'; its columns: id, text"),
             (paths["datasets"], {"text_field": "body"}, "data.text_field", "no column 'body'"),
             (paths["zstd"], {"text_field": "body"}, "data.text_field", "with a 'body' field")]
    for path, changes, key, hint in cases:
        with pytest.raises(ConfigError, match=hint) as e:
            corpora.load_splits(data_config(path, tmp_path / "cache", **changes), lambda m: None)
        assert e.value.key == key and "\n" not in str(e.value)
