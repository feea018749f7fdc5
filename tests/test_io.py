"""The path layer (scalax/io.py) on a local directory and on a GCS emulator: the same calls give the same
answers on both; a second writer of a ledger on GCS is refused; mistakes are one line."""

import os
import subprocess
import sys

import numpy as np
import pytest

from scalax import io
from scalax.errors import ConfigError
from tests.conftest import GCS_ENV, REPO


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("bucket") + "/root"


def test_the_same_calls_give_the_same_answers(root):
    a, b = io.join(root, "dir", "a.json"), io.join(root, "dir", "sub", "b.txt")
    io.atomic_write_json(a, {"x": 1.5})
    io.atomic_write_text(b, "one\n")
    io.append_text(b, "two\n")
    assert io.read_json(a) == {"x": 1.5}
    assert io.read_text(b) == "one\ntwo\n" and io.getsize(b) == 8
    assert io.exists(a) and io.isfile(a) and not io.isdir(a)
    assert io.isdir(io.join(root, "dir")) and not io.isfile(io.join(root, "dir"))
    assert io.listdir(io.join(root, "dir")) == ["a.json", "sub"]
    assert io.listdir(io.join(root, "nothing")) == []
    io.move(io.join(root, "dir", "sub"), io.join(root, "moved", "sub"))
    assert io.read_text(io.join(root, "moved", "sub", "b.txt")) == "one\ntwo\n"
    assert not io.exists(b)
    io.remove(io.join(root, "moved"))
    assert not io.exists(io.join(root, "moved", "sub", "b.txt"))
    io.remove(io.join(root, "moved"))  # removing what is not there is no error


def test_a_tree_is_copied_whole_and_a_partial_copy_left_before_is_replaced(root):
    source, target = io.join(root, "src"), io.join(root, "copies", "7")
    for name, text in (("a.txt", "a"), ("d/b.txt", "bb"), ("d/e/c.bin", "ccc")):
        io.atomic_write_text(io.join(source, name), text)
    io.atomic_write_text(io.join(root, "copies", "7.copying", "stale.txt"), "left by a killed copy")
    io.copytree(source, target)
    assert io.listdir(io.join(root, "copies")) == ["7"]
    assert [io.read_text(io.join(target, n)) for n in ("a.txt", "d/b.txt", "d/e/c.bin")] == ["a", "bb", "ccc"]
    assert io.listdir(target) == ["a.txt", "d"] and io.read_text(io.join(source, "d/e/c.bin")) == "ccc"


def test_a_second_writer_of_a_versioned_file_is_refused(bucket):
    path = f"{bucket}/sweep/runs.jsonl"
    data, version = io.read_versioned(path)
    assert data is None and version == 0
    first = io.write_versioned(path, b"a\n", version)
    _, other = io.read_versioned(path)  # a second runner reads the same generation ...
    io.write_versioned(path, b"a\nb\n", first)  # ... the first writes again ...
    with pytest.raises(io.StorageError, match="changed by another writer"):
        io.write_versioned(path, b"a\nc\n", other)  # ... and the second may not undo it
    assert io.read_bytes(path) == b"a\nb\n"
    with pytest.raises(io.StorageError):
        io.write_versioned(path, b"x\n", 0)  # "create" when it exists


def test_mirrored_dir_uploads_what_grew(bucket):
    mirrored = io.MirroredDir(f"{bucket}/tb")
    with open(os.path.join(mirrored.local, "events"), "ab") as f:
        f.write(b"12")
    mirrored.sync()
    assert io.read_bytes(f"{bucket}/tb/events") == b"12"
    with open(os.path.join(mirrored.local, "events"), "ab") as f:
        f.write(b"34")
    mirrored.sync()
    assert io.read_bytes(f"{bucket}/tb/events") == b"1234"


def test_url_mistakes_are_one_line(bucket):
    with pytest.raises(ConfigError, match=r"--workdir: s3://b/x: unknown URL scheme s3://; allowed: a local path"):
        io.check_output_dir("s3://b/x", "--workdir")
    with pytest.raises(ConfigError, match="the bucket no-such-bucket-scalax does not exist"):
        io.check_output_dir("gs://no-such-bucket-scalax/run", "--workdir")
    with pytest.raises(ConfigError, match="no bucket name"):
        io.check_output_dir("gs:///run", "--workdir")
    io.atomic_write_text(f"{bucket}/file", "x")
    with pytest.raises(ConfigError, match="is an object"):
        io.check_output_dir(f"{bucket}/file", "--workdir")
    io.make_output_dir(f"{bucket}/new/run", "--workdir")  # writable: the probe object is gone again
    assert io.listdir(f"{bucket}/new/run") == []


def test_a_bucket_that_may_not_be_written_is_one_line(bucket, monkeypatch):
    """The emulator grants every write, so the refusal GCS gives an account without storage.objects.create (gcsfs
    raises it as a PermissionError) is played by a fake upload; the probe write turns it into one line."""
    def refuse(path, data):
        raise PermissionError(f"Forbidden: scalax@example.iam does not have storage.objects.create access to {path}."
                              "\nmore detail")

    monkeypatch.setattr(io, "atomic_write_bytes", refuse)
    with pytest.raises(ConfigError, match=r"^--workdir: cannot write to gs://.*/run: Forbidden: .* does not have "
                                          r"storage.objects.create access to .*\.$"):
        io.make_output_dir(f"{bucket}/run", "--workdir")


def _cli(*argv, env):
    return subprocess.run([sys.executable, "-m", "scalax", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_names_the_bucket_problem_in_one_line(bucket, tmp_path):
    env = {**os.environ, **GCS_ENV, "JAX_PLATFORMS": "cpu"}
    cases = [("gs://no-such-bucket-scalax/run", "the bucket no-such-bucket-scalax does not exist"),
             ("s3://b/run", "unknown URL scheme s3://")]
    for workdir, words in cases:
        proc = _cli("train", "--config=configs/gpt.py:size=tiny", f"--workdir={workdir}", env=env)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(REPO, "gs:"))  # nothing made locally under the URL's name
    # No credentials: no emulator, no key file, no gcloud login, not on GCE (checked without any network).
    bare = {k: v for k, v in env.items() if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
    bare.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), NO_GCE_CHECK="True")
    proc = _cli("fit", f"{bucket}/sweep", env=bare)
    assert proc.returncode == 2 and "no Google Cloud credentials found" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_token_cache_on_a_bucket_is_built_once_and_read_elsewhere(bucket, tmp_path, monkeypatch):
    """A gs:// data.cache_dir: the first machine tokenizes (a BPE trained too) and uploads; a second machine
    (an empty local mirror) reads the bucket's cache without tokenizing; both equal a local cache's streams."""
    from ml_collections import ConfigDict

    from scalax.data import corpora

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over a lazy dog " * (i + 3))

    def load(cache_dir, machine):
        monkeypatch.setenv("SCALAX_CACHE", str(tmp_path / machine))
        cfg = ConfigDict({"corpus": str(corpus), "text_field": "text", "val_fraction": 0.25, "tokenizer": "bpe",
                          "bpe_vocab_size": 300, "cache_dir": cache_dir})
        lines = []
        return corpora.load_splits(cfg, log=lines.append), lines

    local, _ = load(str(tmp_path / "local-cache"), "first")
    first, first_log = load(f"{bucket}/cache", "first")
    second, second_log = load(f"{bucket}/cache", "second")
    assert any("tokenizing" in line for line in first_log)
    assert not any("tokenizing" in line or "training" in line for line in second_log), second_log
    [name] = io.listdir(f"{bucket}/cache")
    assert io.listdir(f"{bucket}/cache/{name}") == ["header.json", "tokenizer.json", "train-00000.bin",
                                                       "val-00000.bin"]
    for splits in (first, second):
        assert splits.tokenizer.hash == local.tokenizer.hash and splits.header == local.header
        np.testing.assert_array_equal(splits.train, local.train)
        np.testing.assert_array_equal(splits.val, local.val)
