"""Shared fixtures: every test gets its own real pool (and later catalog) under tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.storage.pool import ChunkPool


@pytest.fixture
def pool(tmp_path: Path) -> ChunkPool:
    return ChunkPool.create(tmp_path / "pool")
