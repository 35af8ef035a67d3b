"""The shared file primitives: the atomic durable replace, pwrite_all, pipelined."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tandem.storage import fileio
from tandem.storage.pool import ChunkPool


def test_write_durably_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("old")
    fileio.write_durably(path, b"new", mode=0o600)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_failed_write_keeps_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pool.json"
    path.write_text("old")

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        fileio.write_durably(path, b"new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.json"]


def test_pool_json_is_written_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ChunkPool.create(tmp_path / "pool")
    assert len(synced) == 2  # the file, then its directory
    assert (tmp_path / "pool" / "pool.json").read_text().startswith("{")


def test_pwrite_all_and_pipelined(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fileio.pwrite_all(fd, b"abc" * 1000, 10)
        assert os.pread(fd, 3000, 10) == b"abc" * 1000
    finally:
        os.close(fd)
    with ThreadPoolExecutor(2) as ex:
        jobs = ((lambda i=i: i * i, 1) for i in range(50))
        assert list(fileio.pipelined(ex, jobs, max_jobs=3, max_bytes=2)) == [
            i * i for i in range(50)
        ]
