"""File primitives the storage engine and the daemons share.

Invariants
- ``write_durably`` replaces a file atomically *and* durably: the new bytes are written to a
  temporary file beside it, fsynced, renamed over the old name, and the directory is
  fsynced, so after a crash the name holds the old content or the new, never a torn or
  empty file (a rename without the first fsync can leave an empty file on ext4 and XFS).
- ``pwrite_all`` writes every byte or raises; ``fallocate`` reports failure instead of
  raising, so callers choose their fallback (write zeros, keep the blocks).
- ``pipelined`` runs jobs in a thread pool with bounded jobs and bytes in flight and yields
  their results in order (flat memory whatever the input).
"""

from __future__ import annotations

import ctypes
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: Path | str) -> None:
    """Make the entries of directory ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path | str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module's invariants).
    The file gets ``mode`` (before the umask); the temporary file is removed on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


_fallocate: Any = None


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """Linux ``fallocate(2)`` (e.g. FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE); False when
    the file system or the C library cannot do it."""
    global _fallocate
    if _fallocate is None:
        func = getattr(ctypes.CDLL(None, use_errno=True), "fallocate", None)
        if func is not None:
            func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _fallocate = func or False
    if not _fallocate:
        return False
    return bool(_fallocate(fd, mode, offset, length) == 0)


def pipelined(
    executor: ThreadPoolExecutor,
    jobs: Iterable[tuple[Callable[[], T], int]],
    max_jobs: int,
    max_bytes: int,
) -> Iterator[T]:
    """Run ``(job, weight)`` pairs in ``executor`` and yield their results in order, with at
    most ``max_jobs`` jobs and ``max_bytes`` of weight in flight (flat memory).

    ``jobs`` is consumed lazily in the caller's thread, between results, so it may itself do
    work (read and cut a large file). On an exception the jobs not yet started are cancelled.
    """
    pending: deque[tuple[Future[T], int]] = deque()
    weight = 0
    try:
        for job, w in jobs:
            while pending and (len(pending) >= max_jobs or weight + w > max_bytes):
                fut, fw = pending.popleft()
                weight -= fw
                yield fut.result()
            pending.append((executor.submit(job), w))
            weight += w
        while pending:
            fut, fw = pending.popleft()
            weight -= fw
            yield fut.result()
    finally:
        for fut, _ in pending:
            fut.cancel()
