"""An agent's capture into an appliance session (``RemotePool``) with batches in flight:
every chunk is stored before the manifest commits, and a broken session fails the capture
with the appliance's error instead of hanging or committing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tandem.errors import TandemError
from tandem.storage.pool import ChunkPool
from tandem.storage.tree import capture_tree, restore_tree
from tandem.storage.volume import capture_volume, restore_volume
from tandem.transport import chunks
from tandem.transport.chunks import RemotePool
from tandem.transport.client import ApiClient
from tests.appliance.conftest import Api

MiB = 1024 * 1024


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """One chunk a batch: many batches, SENDERS of them in flight."""
    monkeypatch.setattr(chunks, "BATCH_COUNT", 1)


def _session(api: Api) -> tuple[object, ApiClient, str]:
    site = api.appliance.site
    session, token = site.sessions.open(job_id="test", write=True)
    client = ApiClient(site.url, token, site.fingerprint)
    return session, client, session.id


def test_a_volume_sent_in_parallel_batches_commits_whole(
    api: Api, tmp_path: Path, small_batches: None
) -> None:
    source = tmp_path / "vol.img"
    source.write_bytes(os.urandom(8 * MiB) + (b"text " * MiB)[: 4 * MiB] + bytes(4 * MiB))
    session, client, sid = _session(api)
    sessions = api.appliance.site.sessions
    try:
        with client:
            mid, manifest, stats = capture_volume(RemotePool(client, sid), source)
        assert stats.chunks_new == 3  # two random, one text; the zero one is an extent
        assert mid in session.committed  # type: ignore[attr-defined]
        pool: ChunkPool = api.appliance.site.pool
        assert all(pool.has(d) for d in manifest.chunk_ids())
        target = tmp_path / "restored.img"
        restore_volume(pool, manifest, target)
        assert target.read_bytes() == source.read_bytes()
    finally:
        sessions.close(session)  # type: ignore[arg-type]


def test_a_tree_of_small_files_is_stored_whole(
    api: Api, tmp_path: Path, small_batches: None
) -> None:
    root = tmp_path / "tree"
    for i in range(300):
        d = root / f"d{i // 50}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(100 + i))
    session, client, sid = _session(api)
    try:
        with client:
            mid, manifest, stats = capture_tree(RemotePool(client, sid), root)  # type: ignore[arg-type]
        assert stats.chunks_new == 300
        assert mid in session.committed  # type: ignore[attr-defined]
        target = tmp_path / "restored"
        restore_tree(api.appliance.site.pool, manifest, target)
        for i in range(300):
            rel = f"d{i // 50}/f{i}"
            assert (target / rel).read_bytes() == (root / rel).read_bytes()
    finally:
        api.appliance.site.sessions.close(session)  # type: ignore[arg-type]


def test_a_session_closed_mid_capture_fails_it_and_commits_nothing(
    api: Api, tmp_path: Path, small_batches: None
) -> None:
    source = tmp_path / "vol.img"
    source.write_bytes(os.urandom(16 * MiB))
    session, client, sid = _session(api)
    sessions = api.appliance.site.sessions
    pool = RemotePool(client, sid)
    sent = 0

    class Closing(chunks.RemoteWriter):
        def _send(self, batch: list[tuple[bytes, int, list[bytes]]]) -> None:
            nonlocal sent
            sent += 1
            if sent == 2:  # the job gave up (canceled) while batches were under way
                sessions.close(session)  # type: ignore[arg-type]
            super()._send(batch)

    pool.writer = lambda bases=(): Closing(client, sid)  # type: ignore[method-assign]
    with client, pytest.raises(TandemError, match="transfer session"):
        capture_volume(pool, source)  # type: ignore[arg-type]
    assert not session.committed  # type: ignore[attr-defined]
