"""The job tests use the catalog fixtures (SQLite, and PostgreSQL with TANDEM_TEST_PG_URL)."""

from __future__ import annotations

from tests.catalog.conftest import catalog, catalog_url

__all__ = ["catalog", "catalog_url"]
