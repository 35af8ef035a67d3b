"""Opening the catalog database: engine, sessions, schema migrations.

Invariants
- ``open_catalog`` brings the schema to the newest Alembic revision before it returns, in one
  transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: under an advisory lock), so several
  processes opening one catalog at once migrate it once.
- SQLite runs in WAL mode with foreign keys on and a 30 s busy timeout. tandem, not the
  ``sqlite3`` module, emits ``BEGIN``: reads take a snapshot (``BEGIN DEFERRED``), write
  transactions take the write lock up front (``BEGIN IMMEDIATE``) so a transaction never has
  to upgrade a read lock, which SQLite answers with "database is locked" instead of waiting.
- PostgreSQL is reached with psycopg 3; ``postgresql://`` URLs are rewritten to
  ``postgresql+psycopg://``.
- ``Catalog.begin()`` is the unit of work: it commits when the block ends and rolls back if
  it raises. Query functions never commit; they flush.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tandem.errors import CatalogUnavailable, CatalogUrlInvalid, Unreachable

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_WRITE = "tandem_write"
_BUSY_TIMEOUT_MS = 30_000
# Any constant works; it only has to be the same in every process that migrates this schema.
_PG_MIGRATION_LOCK = 0x74616E64656D


def normalize_url(url: str) -> str:
    """The SQLAlchemy URL to use for ``url`` (PostgreSQL URLs get the psycopg 3 driver)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def alembic_config(url: str | None = None) -> Config:
    """An Alembic configuration built in code: no ``alembic.ini`` is needed at run time."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        # ConfigParser interpolates '%': escape it (URL-encoded passwords contain it).
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


class Catalog:
    """The catalog database of one appliance: an engine and its sessions."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._read = sessionmaker(bind=engine, expire_on_commit=False)
        self._write = sessionmaker(
            bind=engine.execution_options(**{_WRITE: True}), expire_on_commit=False
        )

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @property
    def url(self) -> str:
        """The database URL with the password hidden (for messages and logs)."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def begin(self) -> Iterator[Session]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        with self._unavailable(), self._write() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading, on a consistent snapshot (SQLite) or statement by statement
        (PostgreSQL, read committed). Nothing is committed: closing it rolls back, and the
        objects read stay usable (they are not expired) after the block."""
        with self._unavailable(), self._read() as session:
            yield session

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        """Turn a lost or refused database connection into ``CatalogUnavailable`` (a 503 the
        operator can act on, not an internal error). On SQLite only a busy database is: its
        other operational errors (a missing table…) are bugs and stay as they are."""
        try:
            yield
        except OperationalError as exc:
            lines = str(exc.orig or exc).strip().splitlines()
            reason = lines[0] if lines else type(exc).__name__
            if self.dialect == "sqlite" and "locked" not in reason and "busy" not in reason:
                raise
            raise CatalogUnavailable(url=self.url, reason=reason) from exc

    def close(self) -> None:
        """Close every pooled connection (sessions still open are the caller's bug)."""
        self.engine.dispose()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (see the module docstring).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def create_catalog_engine(url: str) -> Engine:
    """An engine for ``url`` with tandem's connection settings, without touching the schema."""
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise CatalogUrlInvalid(url=url, problem="is not a database URL") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:") or "mode=memory" in url:
            raise CatalogUrlInvalid(
                url=url, problem="names an in-memory SQLite database, which keeps nothing"
            )
        engine = create_engine(parsed, connect_args={"timeout": _BUSY_TIMEOUT_MS / 1000})
        _install_sqlite_hooks(engine)
        return engine
    if backend == "postgresql":
        return create_engine(parsed, pool_pre_ping=True)
    raise CatalogUrlInvalid(
        url=parsed.render_as_string(),
        problem=f"names the {backend} backend, which tandem does not use",
    )


def upgrade_schema(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    config = alembic_config()
    with engine.execution_options(**{_WRITE: True}).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
            )
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_catalog(url: str, *, upgrade: bool = True) -> Catalog:
    """Open (and create or upgrade, unless ``upgrade`` is false) the catalog at ``url``."""
    engine = create_catalog_engine(url)
    if upgrade:
        try:
            upgrade_schema(engine)
        except OperationalError as exc:
            engine.dispose()
            raise Unreachable(
                what="catalog database",
                name=engine.url.database or "",
                url=engine.url.render_as_string(hide_password=True),
                reason=str(exc.orig or exc).strip().splitlines()[0],
            ) from exc
    return Catalog(engine)
