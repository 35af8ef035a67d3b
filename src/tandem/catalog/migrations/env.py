"""Alembic environment of the catalog.

``tandem.catalog.db.upgrade_schema`` runs the migrations on a connection it already holds
(passed in ``config.attributes["connection"]``), inside its own transaction. The URL form
(``sqlalchemy.url``) is for revisions written by hand: change ``models.py``, bring a scratch
catalog to the current head (``open_catalog("sqlite:////tmp/c.db")``), then::

    from alembic import command
    from tandem.catalog.db import alembic_config
    command.revision(alembic_config("sqlite:////tmp/c.db"), "what changed",
                     autogenerate=True, rev_id="0002")

and review the generated file (``migrations/versions/0002_what_changed.py``).

Types are compared (``compare_type``), and SQLite gets batch mode so ALTERs work there.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection
from sqlalchemy.types import TypeDecorator

from tandem.catalog.models import Base

config = context.config
target_metadata = Base.metadata


def _render_item(kind: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render tandem's column types as the plain SQL type they store (``EnumText`` is a
    ``String(32)``, ``UTCDateTime`` a ``DateTime(timezone=True)``), so revisions never import
    application code."""
    if kind == "type" and isinstance(obj, TypeDecorator):
        return f"sa.{obj.impl_instance!r}"
    return False


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_item=_render_item,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("no connection and no sqlalchemy.url given to the migrations")
    from tandem.catalog.db import create_catalog_engine

    engine = create_catalog_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
