"""One path layer for local directories and object stores (``gs://``, ``s3://``, any fsspec URL).

Every file maskjax writes or reads by name goes through here, so a workdir, a sweep directory, an
export target, ``init_from`` or a data directory may be ``gs://bucket/run`` as well as a local path.
Orbax checkpoints reach the same stores on their own (tensorstore's drivers, etils.epath for metadata).

Local paths keep POSIX semantics (``os.replace`` for atomic writes, ``O_APPEND``). On an object store an
object is written whole in one request, so :func:`write_text` is atomic there too; appending rewrites
the object, which :class:`Appender` batches (``flush_secs``) because a rewrite costs a request and the
object's size.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import posixpath
import shutil
import time

import fsspec

from maskjax.errors import MaskjaxError

_LOCAL_SCHEMES = ("", "file")
EXIT_STORAGE = 6
# gcsfs logs every retry and fallback with a traceback; a failure reaches the user as one StorageError line
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


class StorageError(MaskjaxError, OSError):
    """An object store that could not be reached or refused a request; names the URL. Nothing
    committed before is lost (checkpoints, metrics up to the last flush): run again when it is back."""

    exit_status = EXIT_STORAGE
    hard_exit = True  # Orbax's writer threads wait on the same store forever: leave without joining them


@contextlib.contextmanager
def _reaching(action: str, path):
    """Turns a store's exception (aiohttp, HTTP, auth) into one :class:`StorageError` line; a missing
    object stays FileNotFoundError, which callers test for."""
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise StorageError(f"could not {action} {os.fspath(path)}: {type(err).__name__}: {reason}") from err


def _reported(action: str):
    """Remote calls of the decorated function raise :class:`StorageError` (local ones are unchanged)."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(path, *args, **kwargs):
            if not remote(path):
                return fn(path, *args, **kwargs)
            with _reaching(action, path):
                return fn(path, *args, **kwargs)
        return call
    return wrap


def scheme(path) -> str:
    path = os.fspath(path)
    return path.split("://", 1)[0] if "://" in path else ""


def remote(path) -> bool:
    """True for an object-store URL (gs://, s3://, ...)."""
    return scheme(path) not in _LOCAL_SCHEMES


def _local(path) -> str:
    path = os.fspath(path)
    return path[len("file://"):] if path.startswith("file://") else path


def _fs(path):
    """(fsspec file system, path inside it); the listing cache is dropped because tensorstore and other
    processes write to the same bucket behind gcsfs's back."""
    fs, inner = fsspec.core.url_to_fs(os.fspath(path))
    fs.invalidate_cache()
    return fs, inner


def forget_listings(path) -> None:
    """Drops the cached listings of ``path``'s store, also those of the gcsfs instance Orbax lists steps
    through (etils.epath keeps its own, created with ``finalize_on_close=True``): another process may
    have written or deleted steps since this one last looked, and Orbax would otherwise trust a stale
    listing (missing new steps, or taking a deleted one for an unfinished save to remove)."""
    if not remote(path):
        return
    _fs(path)
    if os.fspath(path).startswith("gs://"):
        fsspec.filesystem("gcs", finalize_on_close=True).invalidate_cache()


def absolute(path) -> str:
    """An absolute local path, or the URL unchanged (without a trailing slash)."""
    return os.fspath(path).rstrip("/") if remote(path) else os.path.abspath(_local(path))


def join(path, *parts) -> str:
    return posixpath.join(os.fspath(path), *parts) if remote(path) else os.path.join(_local(path), *parts)


def dirname(path) -> str:
    return posixpath.dirname(os.fspath(path).rstrip("/")) if remote(path) else os.path.dirname(_local(path))


def basename(path) -> str:
    return posixpath.basename(os.fspath(path).rstrip("/"))


def _query(local, method: str, doc: str):
    @_reported("look up")
    def query(path) -> bool:
        if not remote(path):
            return local(_local(path))
        fs, inner = _fs(path)
        return getattr(fs, method)(inner)

    query.__name__, query.__doc__ = method, doc
    return query


exists = _query(os.path.exists, "exists", "True when a file or directory (a prefix with objects) is there.")
isdir = _query(os.path.isdir, "isdir", "True for a directory (on an object store: a prefix with objects).")
isfile = _query(os.path.isfile, "isfile", "True for a file (an object).")


def makedirs(path) -> None:
    """Local directories are created; object stores have none (a prefix exists once an object does)."""
    if not remote(path):
        os.makedirs(_local(path), exist_ok=True)


@_reported("list")
def listdir(path) -> list[str]:
    """Names of the entries directly under ``path`` (files and directories), sorted; [] when absent."""
    if not remote(path):
        return sorted(os.listdir(_local(path))) if os.path.isdir(_local(path)) else []
    fs, inner = _fs(path)
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False))
    except FileNotFoundError:
        return []


def files(path) -> dict[str, int]:
    """``{path relative to path: size}`` of every file below ``path``."""
    if not remote(path):
        root, out = _local(path), {}
        for directory, _, names in os.walk(root):
            for name in names:
                full = os.path.join(directory, name)
                out[os.path.relpath(full, root)] = os.path.getsize(full)
        return out
    return {rel: size for rel, (size, _) in digests(path).items()}


@_reported("list")
def digests(path) -> dict[str, tuple[int, str]]:
    """``{relative path: (size, digest)}`` of every file below ``path``. Locally the digest is the
    SHA-256 of the bytes; on an object store it is the checksum the store computed on upload (GCS's
    crc32c or md5, S3's ETag), read from one listing instead of downloading every object again."""
    if not remote(path):
        out = {}
        for rel, size in sorted(files(path).items()):
            digest = hashlib.sha256()
            with open(os.path.join(_local(path), rel), "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            out[rel] = (size, "sha256:" + digest.hexdigest())
        return out
    fs, inner = _fs(path)
    try:
        found = fs.find(inner, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    root = inner.rstrip("/") + "/"
    for full, info in sorted(found.items()):
        if info.get("type") == "directory" or full.endswith("/"):
            continue
        stored = next((f"{key}:{info[key]}" for key in ("crc32c", "md5Hash", "ETag") if info.get(key)), "")
        out[full[len(root):] if full.startswith(root) else full] = (int(info.get("size") or 0), stored)
    return out


@_reported("read")
def read_bytes(path) -> bytes:
    if not remote(path):
        with open(_local(path), "rb") as f:
            return f.read()
    fs, inner = _fs(path)
    return fs.cat_file(inner)


def read_text(path) -> str:
    return read_bytes(path).decode("utf-8")


@contextlib.contextmanager
def _replacing(local: str):
    """A binary file that becomes ``local`` when the block ends (written beside it, then ``os.replace``)."""
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        yield f
    os.replace(tmp, local)


@_reported("write")
def write_bytes(path, data: bytes) -> None:
    """Atomic: readers see the old content or the new, never a part (``os.replace`` locally, one
    object upload remotely)."""
    if not remote(path):
        with _replacing(_local(path)) as f:
            f.write(data)
        return
    fs, inner = _fs(path)
    fs.pipe_file(inner, data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@_reported("open")
def open_file(path, mode: str = "r"):
    """A file object; remote writes are uploaded when it is closed."""
    if not remote(path):
        if any(m in mode for m in "wa"):
            os.makedirs(os.path.dirname(os.path.abspath(_local(path))), exist_ok=True)
        return open(_local(path), mode)
    fs, inner = _fs(path)
    return fs.open(inner, mode)


@_reported("remove")
def remove(path) -> None:
    """Removes a file or a directory tree; absent is fine."""
    if not remote(path):
        local = _local(path)
        if os.path.isdir(local):
            shutil.rmtree(local)
        elif os.path.lexists(local):
            os.remove(local)
        return
    fs, inner = _fs(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


@_reported("move")
def move(src, dst) -> None:
    """Moves a file or directory tree (on an object store: copy, then delete)."""
    if not remote(src) and not remote(dst):
        os.makedirs(os.path.dirname(os.path.abspath(_local(dst))), exist_ok=True)
        shutil.move(_local(src), _local(dst))
        return
    if scheme(src) != scheme(dst):
        raise ValueError(f"cannot move {src} to {dst}: different stores")
    fs, inner = _fs(src)
    fs.mv(inner, _fs(dst)[1], recursive=True)


def copy_file(src, dst) -> None:
    """Copies one file from any store to any store, streamed (shards do not pass through memory whole);
    a local ``dst`` is replaced atomically, a remote one appears when its upload completes."""
    with open_file(src, "rb") as f:
        if remote(dst):
            with open_file(dst, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 24)
        else:
            with _replacing(_local(dst)) as out:
                shutil.copyfileobj(f, out, 1 << 24)


def relative(path, root) -> str:
    """``path`` below ``root`` as a relative path (``root`` joined it)."""
    return os.fspath(path)[len(os.fspath(root).rstrip("/")) + 1:]


def cache_dir() -> str:
    """This host's cache for copies of remote files: ``$MASKJAX_CACHE_DIR``, default ``~/.cache/maskjax``."""
    return os.path.expanduser(os.environ.get("MASKJAX_CACHE_DIR") or "~/.cache/maskjax")


def mirror(path) -> str:
    """Where :func:`local_copy` keeps a remote ``path``: the cache, under the store and bucket path."""
    return os.path.join(cache_dir(), "data", scheme(path), os.fspath(path).split("://", 1)[1].strip("/"))


def local_copy(path) -> str:
    """A local path to read ``path`` from (for libraries that open local files only: sentencepiece,
    array_record): ``path`` itself when local, else its copy in the cache, downloaded unless it is there
    with the same size."""
    if not remote(path):
        return _local(path)
    target = mirror(path)
    size = _size(path)
    if not (os.path.isfile(target) and os.path.getsize(target) == size):
        copy_file(path, target)
    return target


@_reported("look up")
def _size(path) -> int:
    fs, inner = _fs(path)
    return int(fs.size(inner))


def copy_tree(src, dst) -> None:
    """Copies every file below ``src`` to the same relative path below ``dst`` (any store to any)."""
    for rel in files(src):
        copy_file(join(src, rel), join(dst, rel))


def writable(path) -> bool:
    """Whether ``path`` (a directory to be) can be written: its nearest existing local parent is a
    writable directory; an object store is checked on the first write."""
    if remote(path):
        return True
    parent = os.path.abspath(_local(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return os.path.isdir(parent) and os.access(parent, os.W_OK)


def append_text(path, text: str) -> None:
    """Appends once (a rewrite of the whole object on a store; use :class:`Appender` for a stream)."""
    out = Appender(path)
    out.write(text)
    out.close()


class Appender:
    """Appends text to one file. Locally each :meth:`write` is an ``O_APPEND`` write. On an object store
    the object is rewritten whole (objects are immutable), at most every ``flush_secs`` and on
    :meth:`flush` / :meth:`close`; what was there before is read once and kept."""

    def __init__(self, path, flush_secs: float = 30.0):
        self.path = os.fspath(path)
        self.remote = remote(path)
        self.flush_secs = flush_secs
        self._content: list[str] | None = None
        self._dirty = False
        self._flushed = time.monotonic()

    def _load(self) -> list[str]:
        if self._content is None:
            self._content = [read_text(self.path)] if exists(self.path) else []
        return self._content

    def replace(self, text: str) -> None:
        """Replaces the whole content (a rewrite that drops records), written at once."""
        self._content = [text]
        write_text(self.path, text)
        self._dirty = False

    def write(self, text: str) -> None:
        if not self.remote:
            with open_file(self.path, "a") as f:
                f.write(text)
            return
        self._load().append(text)
        self._dirty = True
        if time.monotonic() - self._flushed >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        if self.remote and self._dirty:
            self._content = ["".join(self._content)]
            write_text(self.path, self._content[0])
            self._dirty = False
        self._flushed = time.monotonic()

    def close(self) -> None:
        self.flush()

