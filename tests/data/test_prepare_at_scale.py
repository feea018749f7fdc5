"""`scalax prepare` of a 1 GB corpus (the standard library, 32 copies with variations): peak memory under 1 GB,
measured over the process and its workers; a second run killed midway finishes without redoing its finished
shards, and ends with the same shards as the first; the token count is one per byte plus one end-of-text per
document (the byte tokenizer's closed form)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scalax.data import corpora, shards

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
COPIES = 32  # x 31.5 MB of Python 3.11's standard library
SHARD_TOKENS = 2**25


def make_corpus(root: Path) -> tuple[int, int]:
    """COPIES copies of the standard library's files, each file opened by a line that names its copy (so that
    every copy's documents differ, and fall to the splits by their own ids); returns (documents, bytes)."""
    docs = list(corpora.documents("stdlib"))
    count = size = 0
    for c in range(COPIES):
        for doc in docs:
            path = root / f"copy{c:02d}" / doc.id
            path.parent.mkdir(parents=True, exist_ok=True)
            data = f"# copy {c}\n".encode() + doc.data
            path.write_bytes(data)
            count, size = count + 1, size + len(data)
    return count, size


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its children (the tokenizing workers)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    total = 0
    for p in [pid, *children]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS")), 0)
    return total


def prepare(corpus: Path, cache: Path, log: Path, kill_when=None) -> tuple[int, int]:
    """Run `scalax prepare` in a child process; returns (exit status, peak resident bytes). `kill_when()` true:
    SIGKILL to the child and its workers."""
    cmd = [sys.executable, "-m", "scalax", "prepare", f"--config={ROOT / 'configs/gpt.py'}:size=tiny",
           f"--config.data.corpus={corpus}", f"--config.data.cache_dir={cache}",
           f"--config.data.shard_tokens={SHARD_TOKENS}", "--workers=2"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        peak, deadline = 0, time.time() + 600
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            if (kill_when is not None and kill_when()) or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.05)
    return proc.returncode, peak


def digests(directory: Path) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".bin"):
            h = hashlib.sha256()
            with open(directory / name, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
            out[name] = h.hexdigest()
    return out


def test_prepare_of_a_gigabyte_is_bounded_deterministic_and_resumable(tmp_path):
    corpus = tmp_path / "corpus"
    documents, size = make_corpus(corpus)
    assert size > 1e9
    try:
        code, peak = prepare(corpus, tmp_path / "first", tmp_path / "first.log")
        assert code == 0, (tmp_path / "first.log").read_text()[-2000:]
        assert peak < 1e9, f"peak memory {peak / 1e6:.0f} MB"
        [first] = list((tmp_path / "first").iterdir())
        header = json.loads((first / "header.json").read_text())
        counts = header["counts"]
        assert counts["train"]["tokens"] + counts["val"]["tokens"] == size + documents
        assert counts["train"]["documents"] + counts["val"]["documents"] == documents
        assert [s["tokens"] for s in header["shards"]["train"][:-1]] == [SHARD_TOKENS] * (
            len(header["shards"]["train"]) - 1)
        assert len(header["shards"]["train"]) >= 25

        # the second run: killed once 8 train shards are finished, then run again to the end
        second = tmp_path / "second" / first.name
        progress = second / "progress.json"

        def eight_done() -> bool:
            try:
                return len(json.loads(progress.read_text())["splits"]["train"]["shards"]) >= 8
            except (OSError, ValueError):
                return False

        code, _ = prepare(corpus, tmp_path / "second", tmp_path / "killed.log", kill_when=eight_done)
        assert code == -signal.SIGKILL and not (second / "header.json").exists()
        states = json.loads(progress.read_text())["splits"]
        finished = [shards.shard_name(s, k) for s in shards.SPLITS for k in range(len(states[s]["shards"]))]
        assert len(finished) >= 8
        stamps = {name: os.stat(second / name) for name in finished}
        code, _ = prepare(corpus, tmp_path / "second", tmp_path / "resumed.log")
        log = (tmp_path / "resumed.log").read_text()
        assert code == 0 and "resuming the token shards" in log, log[-2000:]
        for name, st in stamps.items():
            now = os.stat(second / name)
            assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{name} was written again"
        assert json.loads((second / "header.json").read_text()) == header
        assert digests(second) == digests(first)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # 5 GB

