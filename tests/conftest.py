"""Shared fixtures: every test gets its own real pool (and later catalog) under tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.storage.pool import ChunkPool
from tests import mountguard


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
