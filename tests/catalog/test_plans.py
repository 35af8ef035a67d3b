"""Every query behind a list route (and the ones garbage collection and job retention run)
is answered from an index: no temporary B-tree for its order, no table scan.

SQLite: ``EXPLAIN QUERY PLAN``. PostgreSQL (with ``TANDEM_TEST_PG_URL``): ``EXPLAIN`` with
``enable_seqscan``, ``enable_bitmapscan`` and ``enable_sort`` off, so that tables this small
still show whether an index can serve the query and its order (a Sort or a Seq Scan left in
the plan then means none can).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import String, delete, func, literal, select
from sqlalchemy.sql import ClauseElement

from tandem.catalog import queries as q
from tandem.catalog.db import Catalog
from tandem.catalog.models import App, Image, Job, Setting, WalSegment, utcnow
from tandem.domain.images import ImageKind
from tandem.domain.jobs import TERMINAL, JobStatus
from tandem.domain.lifecycle import AppKind
from tandem.jobs.queue import submit_job
from tandem.operations.apps import wal_points


def plan(catalog: Catalog, stmt: ClauseElement) -> str:
    """The query plan of ``stmt``, one step a line."""
    with catalog.engine.connect() as conn:
        compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
        params = compiled.construct_params() or {}
        procs: dict[str, Any] = compiled._bind_processors  # type: ignore[attr-defined]
        values = {k: procs[k](v) if k in procs else v for k, v in params.items()}
        sql = str(compiled)
        if conn.dialect.name == "sqlite":
            order: list[str] = compiled.positiontup or []  # type: ignore[attr-defined]
            args = tuple(values[k] for k in order)
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, args).all()
            return "\n".join(str(r[-1]) for r in rows)
        for knob in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            conn.exec_driver_sql(f"SET {knob} = off")
        rows = conn.exec_driver_sql("EXPLAIN " + sql, values).all()
        return "\n".join(str(r[0]) for r in rows)


def assert_indexed(catalog: Catalog, stmt: ClauseElement) -> str:
    shown = plan(catalog, stmt)
    if catalog.dialect == "sqlite":
        assert "TEMP B-TREE" not in shown, shown
        for line in shown.splitlines():
            if line.startswith("SCAN"):
                assert "INDEX" in line, shown  # an ordered index walk, never the table
    else:
        assert "Seq Scan" not in shown and "Sort" not in shown, shown
        assert "Index" in shown, shown
    return shown


@pytest.fixture
def filled(catalog: Catalog) -> Catalog:
    with catalog.begin() as session:
        q.add_host(session, name="h1", url="https://h1", token="t", fingerprint="00")
        for i in range(30):
            q.add_app(session, name=f"app{i:02}", kind=AppKind.FILESYSTEM, host="h1", path=f"/a{i}")
        for i in range(20):
            q.add_image(session, app="app01", kind=ImageKind.SNAPSHOT, manifest=f"{i:064x}")
            job = submit_job(session, type="capture", app=f"app{i % 3:02}")
            job.status = JobStatus.SUCCEEDED
            job.finished = utcnow()
        q.set_setting(session, key="failback_downtime:app03", value="1.5")
    return catalog


def _cursor_image(catalog: Catalog) -> Image:
    with catalog.read() as session:
        return q.list_images(session, app="app01")[5]


def _cursor_job(catalog: Catalog) -> Job:
    with catalog.read() as session:
        return q.list_jobs(session)[5]


def test_apps_pages_come_from_the_name_index(filled: Catalog) -> None:
    assert_indexed(filled, q.apps_query())
    assert_indexed(filled, q.apps_query(limit=10))
    assert_indexed(filled, q.apps_query(after="app10", limit=10))


def test_images_of_an_app_and_their_pages_come_from_an_index(filled: Catalog) -> None:
    with filled.read() as session:
        app_id = q.get_app(session, name="app01").id
    cursor = _cursor_image(filled)
    assert_indexed(filled, q.images_query(app_id=app_id))
    assert_indexed(filled, q.images_query(app_id=app_id, limit=5))
    assert_indexed(filled, q.images_query(app_id=app_id, after=cursor, limit=5))


def test_retention_finds_an_app_s_oldest_snapshots_from_the_index_alone(filled: Catalog) -> None:
    """A capture past ``--keep`` skips the newest ``keep`` snapshots through the index: at
    10,000 images it read every row to check its kind (14 ms of each capture)."""
    with filled.read() as session:
        app_id = q.get_app(session, name="app01").id
    stmt = q.images_query(app_id=app_id, kind=ImageKind.SNAPSHOT).offset(5)
    shown = assert_indexed(filled, stmt)
    if filled.dialect == "sqlite":
        assert "kind=?" in shown, shown
    else:
        assert "kind" in shown.split("Index Cond", 1)[-1], shown
    with filled.read() as session:
        older = q.images_beyond(session, app="app01", kind=ImageKind.SNAPSHOT, keep=15)
    assert len(older) == 5


@pytest.mark.parametrize(
    "filters",
    [{}, {"app": "app01"}, {"status": JobStatus.SUCCEEDED}, {"app": "app02", "status": None}],
    ids=["all", "app", "status", "app-any-status"],
)
def test_job_pages_come_from_an_index(filled: Catalog, filters: dict[str, Any]) -> None:
    cursor = _cursor_job(filled)
    assert_indexed(filled, q.jobs_query(limit=100, **filters))
    assert_indexed(filled, q.jobs_query(after=cursor, limit=100, **filters))


def test_per_app_settings_are_one_indexed_query(filled: Catalog) -> None:
    """``GET /apps`` reads every app's failback downtime in one query, not one per app."""
    key = func.substr(literal("failback_downtime:", String) + App.name, 1, 64)
    stmt = select(App.name, Setting.value).join(Setting, Setting.key == key)
    shown = plan(filled, stmt)
    if filled.dialect == "sqlite":
        assert "TEMP B-TREE" not in shown, shown
        assert "settings USING" in shown and "(key=?)" in shown, shown
    else:
        assert "Index" in shown, shown
    with filled.read() as session:
        assert q.app_settings(session, prefix="failback_downtime:") == {"app03": "1.5"}
    with filled.begin() as session:  # the scheduler's handbacks are kept by app id
        q.set_setting(session, key=f"handback:{q.get_app(session, name='app04').id}", value="3")
    with filled.read() as session:
        assert q.app_settings(session, prefix="handback:", by_id=True) == {"app04": "3"}
    key = func.substr(literal("handback:", String) + App.id, 1, 64)
    shown = plan(filled, select(App.name, Setting.value).join(Setting, Setting.key == key))
    if filled.dialect == "sqlite":
        assert "TEMP B-TREE" not in shown and "settings USING" in shown, shown
    else:
        assert "Index" in shown, shown


def test_the_wal_recovery_points_of_many_apps_are_two_indexed_queries(filled: Catalog) -> None:
    """``GET /apps`` (and /metrics) judge a PostgreSQL app's RPO on the newest WAL it holds:
    one grouped index search for all the apps, not every segment of every app loaded."""
    t0 = utcnow() - timedelta(hours=1)
    with filled.begin() as session:
        q.add_template(session, name="mirrored", mirror=True)
        for name in ("pg1", "pg2", "pg3"):
            q.add_app(session, name=name, kind=AppKind.POSTGRESQL, host="h1", path=f"/{name}")
        q.set_app_template(session, name="pg2", template="mirrored")
        ids = {a.name: a.id for a in q.list_apps(session)}
        for app, n, size, mirrored in [
            ("pg1", 1, 100, 0),
            ("pg1", 2, 100, 0),
            ("pg1", 3, 0, 0),  # nothing of it held yet
            ("pg2", 1, 100, 100),
            ("pg2", 2, 100, 40),  # not all of it at the peer yet
        ]:
            session.add(
                WalSegment(
                    app_id=ids[app],
                    name=f"{n:024X}",
                    timeline=1,
                    start_lsn=n,
                    size=size,
                    complete=True,
                    digest="0" * 64,
                    seen=t0 + timedelta(minutes=n),
                    mirrored=mirrored,
                    mirrored_seen=t0 + timedelta(minutes=n) if mirrored else None,
                )
            )
    with filled.read() as session:
        templates = {t.name: t for t in q.list_templates(session)}
        rows = q.list_apps(session)
        assert q.app_names(session, kind=AppKind.POSTGRESQL) == ["pg1", "pg2", "pg3"]
        assert wal_points(session, rows, templates) == {
            "pg1": t0 + timedelta(minutes=2),
            "pg2": t0 + timedelta(minutes=1),
        }
    for mirrored in (False, True):
        shown = plan(filled, q.wal_held_query([ids["pg1"], ids["pg2"]], mirrored=mirrored))
        if filled.dialect == "sqlite":
            assert "SEARCH wal_segments USING INDEX" in shown and "SCAN" not in shown, shown
        else:
            assert "Seq Scan" not in shown and "Index" in shown, shown


def test_job_retention_and_gc_reads_use_indexes(filled: Catalog) -> None:
    old = utcnow() - timedelta(days=30)
    stmt = select(Job.id).where(Job.finished < old, Job.status.in_(list(TERMINAL)))
    shown = plan(filled, stmt)
    if filled.dialect == "sqlite":
        assert shown.startswith("SEARCH jobs USING") and "TEMP" not in shown, shown
    else:
        assert "Index" in shown and "Seq Scan" not in shown, shown
    assert_indexed(filled, select(Image.manifest).distinct())
    assert "Seq Scan" not in plan(filled, delete(Job).where(Job.id.in_(["job_x"])))


def test_pages_cover_the_list_once_in_order(filled: Catalog) -> None:
    with filled.read() as session:
        everything = [j.id for j in q.list_jobs(session, limit=1000)]
        seen: list[str] = []
        after = None
        while True:
            page = q.list_jobs(session, after=after, limit=7)
            seen += [j.id for j in page]
            if len(page) < 7:
                break
            after = page[-1].id
        assert seen == everything and len(seen) == 20
        names = [a.name for a in q.list_apps(session, after="app27")]
        assert names == ["app28", "app29"]
        images = q.list_images(session, app="app01")
        assert q.list_images(session, app="app01", after=images[17].id) == images[18:]
