"""Catalog locks: one holder across every process (connection) of a catalog."""

from __future__ import annotations

import secrets

import pytest
from sqlalchemy import text

from tandem.catalog.db import open_catalog
from tandem.catalog.locks import CatalogLock


def test_one_holder_at_a_time_and_released_for_the_next(catalog_url: str) -> None:
    with open_catalog(catalog_url) as one, open_catalog(catalog_url) as two:
        first, second = CatalogLock(one, "scheduler"), CatalogLock(two, "scheduler")
        assert first.try_acquire() and first.held()
        assert first.try_acquire()  # taking it again while holding it: still held
        assert not second.try_acquire() and not second.held()
        assert CatalogLock(two, "gc").try_acquire()  # another name is another lock
        first.release()
        assert not first.held()
        assert second.try_acquire()
        assert not first.try_acquire()
        second.release()


@pytest.mark.postgres
def test_a_holder_whose_connection_dies_loses_the_lock(catalog_url: str) -> None:
    """A process that dies (or loses the database) loses its connection, and so the lock:
    another takes it at once, and the old holder learns it no longer holds it."""
    if not catalog_url.startswith("postgresql"):
        pytest.skip("advisory locks are PostgreSQL's")
    with open_catalog(catalog_url) as one, open_catalog(catalog_url) as two:
        first, second = CatalogLock(one, "scheduler"), CatalogLock(two, "scheduler")
        assert first.try_acquire()
        assert first._connection is not None
        pid = first._connection.execute(text("SELECT pg_backend_pid()")).scalar()
        first._connection.commit()
        with two.begin() as session:
            session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        assert second.try_acquire()
        assert not first.held()
        assert not first.try_acquire()
        second.release()


@pytest.mark.postgres
def test_catalogs_in_two_schemas_of_one_database_do_not_share_locks(catalog_url: str) -> None:
    if not catalog_url.startswith("postgresql"):
        pytest.skip("schemas are PostgreSQL's")
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    url = make_url(catalog_url)
    other_schema = "test_other_" + secrets.token_hex(4)
    admin = create_engine(url)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{other_schema}"')
    try:
        other = url.update_query_dict({"options": f"-csearch_path={other_schema}"})
        with (
            open_catalog(catalog_url) as one,
            open_catalog(other.render_as_string(hide_password=False)) as two,
        ):
            first, second = CatalogLock(one, "scheduler"), CatalogLock(two, "scheduler")
            assert first.try_acquire() and second.try_acquire()
            first.release()
            second.release()
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{other_schema}" CASCADE')
        admin.dispose()
