"""Catalog fixtures: a real SQLite catalog in tmp_path, and the same on PostgreSQL.

Set ``TANDEM_TEST_PG_URL`` (e.g. ``postgresql://tandem:tandem@127.0.0.1/tandem_test``) to
run every test that uses ``catalog`` / ``catalog_url`` a second time on PostgreSQL, each in
a fresh schema of its own (dropped afterwards), so tests never see each other's rows.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from tandem.catalog.db import Catalog, normalize_url, open_catalog

PG_URL = os.environ.get("TANDEM_TEST_PG_URL")
BACKENDS = [pytest.param("sqlite")]
if PG_URL:
    BACKENDS.append(pytest.param("postgresql", marks=pytest.mark.postgres))


@pytest.fixture(params=BACKENDS)
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
        return
    assert PG_URL is not None
    base = make_url(normalize_url(PG_URL))
    schema = "test_" + secrets.token_hex(6)
    admin = create_engine(base)
    try:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = base.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    with open_catalog(catalog_url) as opened:
        yield opened
