"""Test helpers that reach one chunk's bytes on disk, whether it is packed or a file."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

from tandem.storage import packs
from tandem.storage.pool import ChunkPool


def chunk_file(pool: ChunkPool, digest: bytes) -> Path:
    """The chunk file of ``digest``. A packed chunk is first moved out of its pack into a
    chunk file of its own (its pack's index rewritten without it), so that a test can
    damage, remove or age that one chunk as it could before packs."""
    path = pool.chunk_path(digest)
    pool.packs.refresh(force=True)
    if pool.packs.lookup(digest) is None:
        return path
    path.write_bytes(pool.get_stored(digest))
    for pack_id in pool.packs.packs():
        entries = pool.packs.entries(pack_id)
        rest = [e for e in entries if e[0] != digest]
        if rest == entries:
            continue
        if rest:
            Path(pool.packs.idx_path(pack_id)).write_bytes(packs.encode_index(rest))
        else:
            for name in (pool.packs.idx_path(pack_id), pool.packs.pack_path(pack_id)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
        pool.packs.drop(pack_id)
    pool.packs.refresh(force=True)
    assert pool.packs.lookup(digest) is None
    return path


def age_pool(pool: ChunkPool, seconds: float) -> None:
    """Make every chunk (file or pack) and manifest ``seconds`` old."""
    old = time.time() - seconds
    for digest, _ in pool.iter_loose_chunks():
        with contextlib.suppress(FileNotFoundError):
            os.utime(pool.chunk_path(digest), (old, old))
    for entry in os.scandir(pool.packs_dir):
        os.utime(entry.path, (old, old))
    for mid in pool.list_manifests():
        os.utime(pool.manifest_path(mid), (old, old))


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def drops_pages(directory: Path) -> bool:
    """Whether the file system of ``directory`` lets written pages leave the page cache
    (not tmpfs, whose pages are the data)."""
    probe = directory / ".probe-page-cache"
    probe.write_bytes(os.urandom(1 << 20))
    try:
        fd = os.open(probe, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return resident_bytes(probe) == 0
    finally:
        probe.unlink()


def chunk_files(pool: ChunkPool, digests: list[bytes]) -> list[Path]:
    """The files holding ``digests``: chunk files and packs, each once."""
    pool.packs.refresh(force=True)
    out: dict[Path, None] = {}
    for digest in digests:
        loc = pool.packs.lookup(digest)
        out[Path(pool.packs.pack_path(loc[0])) if loc else pool.chunk_path(digest)] = None
    return list(out)
