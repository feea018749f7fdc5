"""Files and directories, local or on `gs://`, through one layer: fsspec (gcsfs for `gs://`, the library that
etils epath, and so orbax, uses for the same URLs). Every path scalax reads or writes goes through here, as a
string: a local path behaves as it always did, a `gs://bucket/path` URL the same way on the bucket.

Writes are atomic. Locally: a temporary file in the same directory, fsync, then rename (a reader never sees
half a file; the file gets the mode any file the user writes gets, 0666 less the umask, not mkstemp's 0600).
On GCS an object upload is atomic by itself: a reader sees the old object or the new one. A file that two
writers could race on (a sweep's ledger) is written with `write_versioned`: on GCS under a generation
precondition, so a second writer fails instead of silently undoing the first one's record.

Also the checks every command makes of a directory it is told to write, so that a mistake is one line: an
unknown URL scheme, gcsfs missing, no credentials, a bucket that does not exist, a path that cannot be written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

from scalax.errors import ConfigError, ScalaxError

SCHEMES = ("gs",)  # URL schemes scalax reads and writes; anything else is refused in one line
GCS_EXTRA = "pip install 'scalax[gcs]'"


class StorageError(ScalaxError):
    """A bucket or object that cannot be used as asked (missing, forbidden, raced by another writer)."""


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()


# ---------------------------------------------------------------------- paths
def scheme(path: str) -> str | None:
    """'gs' for gs://bucket/x, None for a local path."""
    path = os.fspath(path)
    return path.split("://", 1)[0] if "://" in path else None


def is_remote(path: str) -> bool:
    return scheme(path) is not None


def check_url(path: str, key: str) -> None:
    """Refuse, in one line naming `key`, a URL scalax cannot use: an unknown scheme, or gs:// without gcsfs."""
    s = scheme(path)
    if s is None:
        return
    if s not in SCHEMES:
        raise ConfigError(key, f"{path}: unknown URL scheme {s}://; allowed: a local path or gs://BUCKET/PATH")
    if not path.removeprefix(f"{s}://").split("/", 1)[0]:
        raise ConfigError(key, f"{path}: no bucket name; allowed: gs://BUCKET/PATH")
    try:
        import gcsfs  # noqa: F401  (optional: only gs:// needs it)
    except ImportError:
        raise ConfigError(key, f"{path}: gs:// paths need gcsfs, which is not installed: {GCS_EXTRA}") from None


def join(path: str, *parts: str) -> str:
    return os.path.join(path, *parts)  # posix joins are URL joins too: gs://b/x + y = gs://b/x/y


def abspath(path: str) -> str:
    """A local path made absolute; a URL as it is."""
    return path if is_remote(path) else os.path.abspath(path)


def bucket(path: str) -> str:
    return path.split("://", 1)[1].split("/", 1)[0]


def _no_listings_cache() -> None:
    """Every GCS filesystem of this process, ours and the one orbax reaches through etils epath, without a
    listings cache: other processes (the runs of a sweep, the other hosts of a run) and this one's other
    instance change the bucket, and a cached listing would hide their changes (orbax would see a checkpoint
    step that was moved aside)."""
    import fsspec.config

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


_no_listings_cache()


def _fs(path: str):
    """The fsspec filesystem for `path`."""
    import fsspec

    if is_remote(path):
        check_url(path, "path")
        return fsspec.filesystem("gcs")
    return fsspec.filesystem("file")


# ---------------------------------------------------------------------- reading and asking
def exists(path: str) -> bool:
    return _fs(path).exists(path)


def isfile(path: str) -> bool:
    return _fs(path).isfile(path)


def isdir(path: str) -> bool:
    """A directory; on GCS, a prefix with at least one object below it."""
    return _fs(path).isdir(path)


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries of a directory, sorted; [] when there is none."""
    if not isdir(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in _fs(path).ls(path, detail=False)
                  if p.rstrip("/") != path.removeprefix("gs://").rstrip("/"))


def getsize(path: str) -> int:
    return int(_fs(path).size(path))


def read_bytes(path: str) -> bytes:
    """The whole file. On GCS one GET of one generation: opening it would fetch the size first and then ranges,
    which tear when a writer replaces the object in between (a ledger read while the runner records a run)."""
    return _fs(path).cat_file(path)


def read_range(path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file: on GCS one ranged GET."""
    return _fs(path).cat_file(path, start=start, end=end)


def read_text(path: str, errors: str = "strict") -> str:
    return read_bytes(path).decode("utf-8", errors=errors)


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


# ---------------------------------------------------------------------- writing
def makedirs(path: str) -> None:
    """Make a local directory (and its parents); nothing on GCS, where directories are name prefixes."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def atomic_write_bytes(path: str, data: bytes) -> None:
    if is_remote(path):
        with _fs(path).open(path, "wb") as f:  # one upload: the old object or the new one, never half
            f.write(data)
        return
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


def append_text(path: str, text: str) -> None:
    """Add `text` at the end of a file written by one process (metrics.jsonl). Locally an append; on GCS,
    where objects cannot be appended to, the object is replaced by the old text and the new (one upload)."""
    if not is_remote(path):
        with open(path, "a") as f:
            f.write(text)
        return
    old = read_bytes(path) if exists(path) else b""
    atomic_write_bytes(path, old + text.encode("utf-8"))


def remove(path: str) -> None:
    """Delete a file or a directory tree (nothing if it does not exist)."""
    if exists(path):
        _fs(path).rm(path, recursive=isdir(path))


def move(source: str, target: str) -> None:
    """Move a file or a directory tree (on GCS: copy, then delete, object by object)."""
    if is_remote(source):  # object by object (gcsfs's own mv tries an API that not every GCS offers first)
        fs = _fs(source)
        prefix = source.removeprefix("gs://").rstrip("/")
        files = fs.find(source) if fs.isdir(source) else [prefix]
        for name in files:
            fs.cp_file(name, target.rstrip("/") + name[len(prefix):])
        fs.rm(files)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        shutil.move(source, target)


def copytree(source: str, target: str) -> None:
    """Copy a directory tree to `target` (which must not exist): into `target.copying` first (what a copy cut
    short left there is removed), then moved into place, so that `target` never holds part of a copy (on GCS
    the move is object by object: as nearly as it allows)."""
    partial = target.rstrip("/") + ".copying"
    remove(partial)
    if is_remote(source) or is_remote(target):
        src_fs, prefix = _fs(source), source.removeprefix("gs://").rstrip("/")
        for name in src_fs.find(source):
            atomic_write_bytes(partial + name[len(prefix):], src_fs.cat_file(name))
    else:
        shutil.copytree(source, partial)
    move(partial, target)


def upload(local_path: str, path: str) -> None:
    """Copy a local file to `path` (local or remote), atomically."""
    with open(local_path, "rb") as f:
        atomic_write_bytes(path, f.read())


# ---------------------------------------------------------------------- a file two writers could race on
def read_versioned(path: str) -> tuple[bytes | None, int | None]:
    """(contents or None when absent, version): on GCS the object's generation (0: absent), locally None."""
    if not is_remote(path):
        return (read_bytes(path) if os.path.exists(path) else None), None
    blob = _blob(path)
    try:
        data = blob.download_as_bytes()
    except _gcs_exceptions().NotFound:
        return None, 0
    return data, int(blob.generation)


def write_versioned(path: str, data: bytes, version: int | None) -> int | None:
    """Replace `path` if nobody replaced it since `version` (from read_versioned or the last write_versioned);
    returns the new version. On GCS a generation precondition; locally an atomic write (one writer)."""
    if not is_remote(path):
        atomic_write_bytes(path, data)
        return None
    blob = _blob(path)
    try:
        blob.upload_from_string(data, if_generation_match=version)
    except _gcs_exceptions().PreconditionFailed:
        raise StorageError(f"{path} was changed by another writer since this process read it (another scalax "
                           "sweep on the same --workdir?); run one sweep runner per workdir") from None
    return int(blob.generation)


def _gcs_exceptions():
    from google.api_core import exceptions

    return exceptions


def _blob(path: str):
    from google.cloud import storage

    check_url(path, "path")
    name = path.split("://", 1)[1].split("/", 1)[1]
    return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT")).bucket(bucket(path)).blob(name)


# ---------------------------------------------------------------------- local copies of remote files
def cache_root() -> str:
    """This machine's scalax cache: $SCALAX_CACHE, else ~/.cache/scalax (mirrors, the measured CPU peak)."""
    return os.path.expanduser(os.environ.get("SCALAX_CACHE", "~/.cache/scalax"))


def local_mirror(path: str) -> str:
    """A local directory that stands for `path`: `path` itself when local; for a URL a fixed directory under
    ~/.cache/scalax/mirror (the same one every time, so a restarted process finds what it wrote there), for
    files that must be local to be written (a child's log, TensorBoard's event files) and are then uploaded."""
    if not is_remote(path):
        return path
    digest = hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:16]
    root = os.path.join(cache_root(), "mirror")
    local = os.path.join(root, f"{bucket(path)}-{digest}")
    os.makedirs(local, exist_ok=True)
    return local


class MirroredDir:
    """A directory written through a local one: `local` is `path` itself when local, else its local mirror;
    `sync()` uploads each file of the mirror that changed since the last sync, whole. For writers that append
    to their files (TensorBoard's), which GCS cannot do."""

    def __init__(self, path: str):
        self.path, self.local = path, local_mirror(path)
        self._synced = self._sizes() if is_remote(path) else {}  # files already there were uploaded before

    def _sizes(self) -> dict[str, int]:
        if not os.path.isdir(self.local):
            return {}
        return {n: os.path.getsize(os.path.join(self.local, n)) for n in os.listdir(self.local)
                if os.path.isfile(os.path.join(self.local, n))}

    def sync(self) -> None:
        if self.local == self.path:
            return
        for name, size in self._sizes().items():
            if self._synced.get(name) != size:
                upload(os.path.join(self.local, name), join(self.path, name))
                self._synced[name] = size


# ---------------------------------------------------------------------- directories a command writes
def check_output_dir(path: str, key: str) -> None:
    """Refuse, in one line naming `key`, a directory to write that cannot be: an unknown URL scheme, a bucket
    without credentials or that does not exist; locally a file, or not writable (checked on the directory, or
    on its nearest existing parent when it is still to be made). Creates nothing."""
    if is_remote(path):
        _check_bucket(path, key)
        if isfile(path):
            raise ConfigError(key, f"{path} is an object (a file); allowed: a directory (new, or one scalax wrote)")
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = f"{path} is a file" if existing == os.path.abspath(path) else f"{existing} (in {path}) is a file"
        raise ConfigError(key, f"{what}; allowed: a directory (new, or one scalax wrote)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(key, f"cannot write to {path}: {existing} is not writable")


def check_input(path: str, key: str) -> None:
    """Refuse, in one line naming `key`, a URL to read that cannot be (scheme, gcsfs, credentials, bucket)."""
    if is_remote(path):
        _check_bucket(path, key)


def _check_bucket(path: str, key: str) -> None:
    check_url(path, key)
    _check_credentials(path, key)
    try:
        found = _fs(path).exists(bucket(path))
    except PermissionError:
        raise ConfigError(key, f"{path}: this account may not read the bucket {bucket(path)}") from None
    except OSError as e:
        raise ConfigError(key, f"{path}: cannot reach the bucket {bucket(path)} ({_first_line(e)})") from None
    if not found:
        raise ConfigError(key, f"{path}: the bucket {bucket(path)} does not exist (or this account cannot see it); "
                          f"create it (gcloud storage buckets create gs://{bucket(path)}) or name another")


def _check_credentials(path: str, key: str) -> None:
    """Google's application default credentials, unless an emulator stands in for GCS."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError:
        raise ConfigError(key, f"{path}: no Google Cloud credentials found; run `gcloud auth application-default "
                          "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file") from None


def make_output_dir(path: str, key: str) -> None:
    """Create the directory `check_output_dir` allowed, and prove it writable; one line naming `key` if not."""
    check_output_dir(path, key)
    if is_remote(path):
        probe = join(path, f".scalax-write-test-{os.getpid()}")
        try:
            atomic_write_bytes(probe, b"")
            remove(probe)
        except OSError as e:
            raise ConfigError(key, f"cannot write to {path}: {_first_line(e)}") from None
        return
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(key, f"cannot write to {path}: {e.strerror}") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
