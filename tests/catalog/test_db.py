"""Opening the catalog: migrations, connection settings, time zones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from tandem.catalog import Catalog, open_catalog
from tandem.catalog import queries as q
from tandem.catalog.db import alembic_config, normalize_url
from tandem.catalog.models import Base
from tandem.domain.images import ImageKind
from tandem.domain.lifecycle import AppKind
from tandem.errors import InvalidInput, Unreachable


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _schema_diff(catalog: Catalog) -> list[object]:
    with catalog.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def test_migrations_produce_the_models_schema(catalog: Catalog) -> None:
    assert _schema_diff(catalog) == []


def test_schema_comparison_sees_a_difference(catalog: Catalog) -> None:
    # The comparison above is only worth something if it notices a change.
    with catalog.engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_jobs_status_created_id")
    diff = _schema_diff(catalog)
    assert len(diff) == 1
    assert "ix_jobs_status_created_id" in repr(diff[0])


def test_opening_again_is_idempotent_and_keeps_data(catalog_url: str) -> None:
    with open_catalog(catalog_url) as first, first.begin() as session:
        q.add_template(session, name="t1")
    with open_catalog(catalog_url) as second, second.read() as session:
        assert [t.name for t in q.list_templates(session)] == ["t1"]
        assert session.scalar(text("SELECT version_num FROM alembic_version")) == _head()


def test_downgrade_and_upgrade_again(catalog: Catalog) -> None:
    config = alembic_config()
    with catalog.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert set(inspect(catalog.engine).get_table_names()) <= {"alembic_version"}
    with catalog.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    assert _schema_diff(catalog) == []


def test_old_shell_commands_become_hook_names_only_when_they_are_names(
    catalog_url: str,
) -> None:
    """0002_hook_scripts: a command that is a plain script name is kept as one; any other
    command (something for a shell) is dropped, never run again."""
    with open_catalog(catalog_url, upgrade=False) as catalog:
        config = alembic_config()
        with catalog.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "0001")
        commands = {
            "kept": ("pg-start", "pg_stop.sh"),
            "dropped": ("systemctl start web", "kill $(cat /run/web.pid)"),
            "mixed": ("../escape", "web-stop"),
            "none": (None, None),
        }
        with catalog.engine.begin() as connection:
            for i, (name, (start, stop)) in enumerate(commands.items()):
                connection.execute(
                    text(
                        "INSERT INTO apps (id, name, kind, host, path, start_cmd, stop_cmd, "
                        "state, writer_epoch, created) VALUES (:id, :name, 'filesystem', 'h1', "
                        "'/srv', :start, :stop, 'unmanaged', 1, :created)"
                    ),
                    {
                        "id": f"app_{i:012d}",
                        "name": name,
                        "start": start,
                        "stop": stop,
                        "created": datetime(2026, 1, 1),
                    },
                )
        with catalog.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        assert _schema_diff(catalog) == []
        with catalog.read() as session:
            hooks = {a.name: (a.start_hook, a.stop_hook) for a in q.list_apps(session)}
        assert hooks == {
            "kept": ("pg-start", "pg_stop.sh"),
            "dropped": (None, None),
            "mixed": (None, "web-stop"),
            "none": (None, None),
        }


def test_sqlite_connection_settings(tmp_path: Path) -> None:
    with open_catalog(f"sqlite:///{tmp_path / 'c.db'}") as catalog, catalog.read() as session:
        assert session.scalar(text("PRAGMA journal_mode")) == "wal"
        assert session.scalar(text("PRAGMA foreign_keys")) == 1
        assert session.scalar(text("PRAGMA busy_timeout")) == 30_000


def test_sqlite_write_transactions_take_the_lock_up_front(tmp_path: Path) -> None:
    with open_catalog(f"sqlite:///{tmp_path / 'c.db'}") as catalog:
        with catalog.begin() as session:
            raw = session.connection().connection.dbapi_connection
            assert raw is not None
            assert raw.in_transaction  # BEGIN IMMEDIATE ran before any statement
        with catalog.read() as session:
            session.scalar(text("SELECT 1"))
            raw = session.connection().connection.dbapi_connection
            assert raw is not None and raw.in_transaction


def test_urls() -> None:
    assert normalize_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:////x.db") == "sqlite:////x.db"
    for url in ("sqlite://", "sqlite:///:memory:", "mysql://h/db", "not a url"):
        with pytest.raises(InvalidInput):
            open_catalog(url)


def test_unreachable_postgres_is_a_clear_error() -> None:
    with pytest.raises(Unreachable, match="catalog database") as info:
        open_catalog("postgresql://nobody:secret@127.0.0.1:1/none?connect_timeout=2")
    assert "secret" not in str(info.value)


def test_timestamps_are_utc_aware(catalog: Catalog) -> None:
    paris = timezone(timedelta(hours=2))
    when = datetime(2030, 5, 1, 12, 0, 0, 123456, tzinfo=paris)
    with catalog.begin() as session:
        q.add_host(session, name="h1", url="https://h1", token="t", fingerprint="f")
        q.add_app(session, name="db", kind=AppKind.FILESYSTEM, host="h1", path="/srv")
        q.add_image(session, app="db", kind=ImageKind.SNAPSHOT, manifest="ab" * 32, created=when)
    with catalog.read() as session:
        (image,) = q.list_images(session, app="db")
        assert image.created == when
        assert image.created.tzinfo is not None
        assert image.created.utcoffset() == timedelta(0)
        host = q.get_host(session, name="h1")
        assert host.created.tzinfo is not None
        assert abs(host.created - datetime.now(UTC)) < timedelta(minutes=1)


def test_naive_datetimes_are_refused(catalog: Catalog) -> None:
    with pytest.raises(Exception, match="naive datetime"), catalog.begin() as session:
        q.add_host(session, name="h1", url="https://h1", token="t", fingerprint="f")
        q.add_app(session, name="db", kind=AppKind.FILESYSTEM, host="h1", path="/srv")
        q.add_image(
            session,
            app="db",
            kind=ImageKind.SNAPSHOT,
            manifest="ab" * 32,
            created=datetime(2030, 1, 1),
        )
