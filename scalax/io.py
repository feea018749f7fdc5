"""Atomic writes: a temporary file in the same directory, fsync, then rename. A reader never sees half a file.
The file gets the mode any file the user writes gets (0666 less the umask), not mkstemp's private 0600.

Also the checks every command makes of a directory it is told to write, so that a mistake is one line."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from scalax.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_output_dir(path: str, key: str) -> None:
    """Refuse, in one line naming `key`, a directory to write that is a URL, a file, or not writable (checked
    on the directory, or on its nearest existing parent when it is still to be made). Creates nothing."""
    if "://" in path:
        scheme = path.split("://", 1)[0]
        raise ConfigError(key, f"{path}: {scheme}:// paths are not supported yet; allowed: a local directory")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = f"{path} is a file" if existing == os.path.abspath(path) else f"{existing} (in {path}) is a file"
        raise ConfigError(key, f"{what}; allowed: a directory (new, or one scalax wrote)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(key, f"cannot write to {path}: {existing} is not writable")


def make_output_dir(path: str, key: str) -> None:
    """Create the directory `check_output_dir` allowed, and prove it writable; one line naming `key` if not."""
    check_output_dir(path, key)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(key, f"cannot write to {path}: {e.strerror}") from None
