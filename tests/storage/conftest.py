"""Fixtures of the storage tests: a real S3 store (Swift + s3api, ``tests.s3server``)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tandem.storage.objstore import ObjectStore, StoreUrl
from tests import s3server


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
