"""Shared fixtures: every test gets its own real pool (and later catalog) under tmp_path."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.storage.objstore import ObjectStore, StoreUrl
from tandem.storage.pool import ChunkPool
from tests import mountguard, s3server


@pytest.fixture(autouse=True)
def _nothing_left_mounted(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that used ``tmp_path`` leaves nothing mounted in it (``tests.mountguard``)."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    folder: Path = request.getfixturevalue("tmp_path")
    yield
    left = mountguard.mounted_under(folder)
    if left:
        mountguard.take_down(left)
        pytest.fail(f"the test left mounted: {left} (taken down by the guard)")


@pytest.fixture(scope="session")
def libvirt_host() -> Iterator[None]:
    """A libvirt host (``qemu:///system``) for the VM tests, started here if it does not
    answer and stopped again only if this started it (``tests.vmguest``)."""
    from tests import vmguest

    with vmguest.libvirt_session():
        yield


@pytest.fixture
def pool(tmp_path: Path) -> ChunkPool:
    return ChunkPool.create(tmp_path / "pool")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    """One Swift cluster for the session (it takes tens of seconds to start)."""
    missing = s3server.available()
    if missing:
        pytest.skip(missing)
    with s3server.swift_s3(tmp_path_factory.mktemp("swift")) as server:
        yield server


@pytest.fixture
def s3_store(s3_server: s3server.S3Server) -> ObjectStore:
    """A new, empty bucket of the session's store, for one test."""
    url = StoreUrl(
        bucket=f"tandem-{secrets.token_hex(6)}", prefix="pool", endpoint=s3_server.endpoint
    )
    store = ObjectStore(url, access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    store.create_bucket()
    return store
