"""Shared fixtures: every test gets its own real pool (and later catalog) under tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.storage.pool import ChunkPool


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
