"""Catalog queries: CRUD, uniqueness, NotFound messages, transitions, images."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tandem.catalog import Catalog
from tandem.catalog import queries as q
from tandem.catalog.models import Image, Job, Token
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import (
    TRANSITIONS,
    AppFacts,
    AppKind,
    AppState,
    Operation,
    allowed_operations,
)
from tandem.domain.rules import Role
from tandem.errors import (
    AlreadyExists,
    Conflict,
    InvalidInput,
    InvalidTransition,
    NotFound,
    TransitionRefused,
)

MANIFEST = "0f" * 32
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _setup_app(session: Session, name: str = "db", host: str = "h1") -> None:
    if not any(h.name == host for h in q.list_hosts(session)):
        q.add_host(session, name=host, url=f"https://{host}:8443", token="tok", fingerprint="fp")
    q.add_app(session, name=name, kind=AppKind.FILESYSTEM, host=host, path="/srv/" + name)


# --- uniqueness and NotFound --------------------------------------------------------------


def test_duplicate_names_raise_already_exists(catalog: Catalog) -> None:
    with catalog.begin() as session:
        _setup_app(session)
        q.add_template(session, name="gold", every_seconds=900, keep=4, mirror=True)
        q.add_peer(session, name="dr", url="https://dr", token="t", fingerprint="f")
        q.add_token(session, name="admin", token="secret", role=Role.ADMIN)
        cases: list[tuple[Callable[[], object], str]] = [
            (lambda: q.add_host(session, name="h1", url="u", token="t", fingerprint="f"), "host"),
            (
                lambda: q.add_app(
                    session, name="db", kind=AppKind.VOLUME, host="h1", path="/dev/x"
                ),
                "application",
            ),
            (lambda: q.add_template(session, name="gold"), "template"),
            (lambda: q.add_peer(session, name="dr", url="u", token="t", fingerprint="f"), "peer"),
            (lambda: q.add_token(session, name="admin", token="other", role=Role.VIEWER), "token"),
        ]
        for add, what in cases:
            with pytest.raises(AlreadyExists) as info:
                add()
            assert info.value.http_status == 409
            assert str(info.value).startswith(f"{what} ")
            assert "already exists. Choose another name" in str(info.value)
        # The savepoint kept the transaction usable: the earlier rows are still there.
        q.add_template(session, name="silver")
    with catalog.read() as session:
        assert [t.name for t in q.list_templates(session)] == ["gold", "silver"]
        assert [a.name for a in q.list_apps(session)] == ["db"]


def test_not_found_messages_name_the_listing_command(catalog: Catalog) -> None:
    with catalog.read() as session:
        with pytest.raises(NotFound) as info:
            q.get_app(session, name="nope")
        assert str(info.value) == (
            "application 'nope' does not exist. List the existing ones with `tandem apps`."
        )
        assert info.value.http_status == 404
        calls: list[tuple[Callable[[], object], str]] = [
            (lambda: q.get_host(session, name="nope"), "`tandem hosts`"),
            (lambda: q.get_template(session, name="nope"), "`tandem templates`"),
            (lambda: q.get_image(session, image_id="img_nope"), "`tandem images APP`"),
            (lambda: q.get_job(session, job_id="job_nope"), "`tandem jobs`"),
            (lambda: q.get_peer(session, name="nope"), "`tandem peers`"),
            (lambda: q.remove_token(session, name="nope"), "`tandem tokens`"),
        ]
        for call, listing in calls:
            with pytest.raises(NotFound, match=listing):
                call()


def test_names_are_validated(catalog: Catalog) -> None:
    with catalog.begin() as session:
        with pytest.raises(InvalidInput, match="host name"):
            q.add_host(session, name="bad name", url="u", token="t", fingerprint="f")
        with pytest.raises(InvalidInput, match="template name"):
            q.add_template(session, name="-x")
        with pytest.raises(InvalidInput, match="positive"):
            q.add_template(session, name="t", every_seconds=0)
        with pytest.raises(InvalidInput, match="positive"):
            q.add_template(session, name="t", keep=-1)


# --- hosts, apps, templates -----------------------------------------------------------------


def test_app_crud(catalog: Catalog) -> None:
    with catalog.begin() as session:
        with pytest.raises(NotFound, match="host 'h1'"):
            q.add_app(session, name="db", kind=AppKind.FILESYSTEM, host="h1", path="/srv")
        _setup_app(session, "web")
        _setup_app(session, "db")
        # A mirrored app keeps its production host, which is not registered at this site.
        q.add_app(
            session, name="crm", kind=AppKind.VOLUME, host="prod9", path="/dev/vg/crm", origin="a"
        )
        q.add_template(session, name="gold", mirror=True)
        q.set_app_template(session, name="db", template="gold")
        with pytest.raises(NotFound):
            q.set_app_template(session, name="db", template="nope")
    with catalog.read() as session:
        apps = q.list_apps(session)
        assert [a.name for a in apps] == ["crm", "db", "web"]
        db = q.get_app(session, name="db")
        assert db.id.startswith("app_")
        assert (db.kind, db.host, db.path, db.template) == (
            AppKind.FILESYSTEM,
            "h1",
            "/srv/db",
            "gold",
        )
        assert db.state is AppState.UNMANAGED
        assert db.writer_epoch == 1


def test_removing_things_in_use_is_refused(catalog: Catalog) -> None:
    with catalog.begin() as session:
        _setup_app(session)
        q.add_template(session, name="gold")
        q.set_app_template(session, name="db", template="gold")
        q.record_transition(session, app="db", operation=Operation.PROTECT)
        q.add_image(session, app="db", kind=ImageKind.SNAPSHOT, manifest=MANIFEST)
        with pytest.raises(Conflict, match="runs the applications db"):
            q.remove_host(session, name="h1")
        with pytest.raises(Conflict, match="protects the applications db"):
            q.remove_template(session, name="gold")
        with pytest.raises(Conflict, match="Unprotect it"):
            q.remove_app(session, name="db")
        q.record_transition(session, app="db", operation=Operation.UNPROTECT)
        with pytest.raises(Conflict, match="1 image"):
            q.remove_app(session, name="db")
        for image in q.list_images(session, app="db"):
            q.delete_image(session, image_id=image.id)
        q.remove_app(session, name="db")
        q.remove_template(session, name="gold")
        q.remove_host(session, name="h1")
    with catalog.read() as session:
        assert q.list_apps(session) == []
        assert q.list_hosts(session) == []
        assert q.list_templates(session) == []


def test_host_with_mounted_image_cannot_be_removed(catalog: Catalog) -> None:
    with catalog.begin() as session:
        _setup_app(session, host="h1")
        q.add_host(session, name="dr1", url="u", token="t", fingerprint="f")
        image = q.add_image(session, app="db", kind=ImageKind.TEST_FAILOVER, manifest=MANIFEST)
        q.set_image_state(session, image_id=image.id, state=ImageState.MOUNTED, mounted_host="dr1")
        with pytest.raises(Conflict, match="mounted"):
            q.remove_host(session, name="dr1")


# --- transitions ----------------------------------------------------------------------------


def test_record_transition_stores_every_step(catalog: Catalog) -> None:
    with catalog.begin() as session:
        _setup_app(session)
        q.record_transition(session, app="db", operation=Operation.PROTECT, actor="alice")
        q.record_transition(session, app="db", operation=Operation.CAPTURE, job="job_1")
        q.record_transition(session, app="db", operation=Operation.FAILOVER, actor="bob")
        q.record_transition(session, app="db", operation=Operation.SYNCBACK)
        q.record_transition(session, app="db", operation=Operation.FAILBACK)
    with catalog.read() as session:
        app = q.get_app(session, name="db")
        assert app.state is AppState.MANAGED
        assert app.writer_epoch == 2  # raised by the failover
        steps = [
            (t.from_state, t.to_state, t.operation, t.actor, t.job, t.epoch)
            for t in q.list_transitions(session, app="db")
        ]
    U, M, F = AppState.UNMANAGED, AppState.MANAGED, AppState.FAILED_OVER
    assert steps == [
        (U, M, Operation.PROTECT, "alice", None, 1),
        (M, M, Operation.CAPTURE, None, "job_1", 1),
        (M, F, Operation.FAILOVER, "bob", None, 2),
        (F, F, Operation.SYNCBACK, None, None, 2),
        (F, M, Operation.FAILBACK, None, None, 2),
    ]


def test_illegal_or_refused_transition_changes_nothing(catalog: Catalog) -> None:
    with catalog.begin() as session:
        _setup_app(session)
    with catalog.begin() as session:
        with pytest.raises(InvalidTransition, match="Allowed operations now: clone"):
            q.record_transition(session, app="db", operation=Operation.FAILOVER)
        # PROTECT has no guard, so default (refusing) facts pass.
        q.record_transition(session, app="db", operation=Operation.PROTECT, facts=AppFacts())
        with pytest.raises(TransitionRefused, match="no replica image"):
            q.record_transition(session, app="db", operation=Operation.FAILOVER, facts=AppFacts())
    with catalog.read() as session:
        app = q.get_app(session, name="db")
        assert (app.state, app.writer_epoch) == (AppState.MANAGED, 1)
        assert [t.operation for t in q.list_transitions(session, app="db")] == [Operation.PROTECT]


def test_random_walk_over_the_lifecycle(catalog: Catalog) -> None:
    """A long random walk: the stored chain is continuous and the epoch never goes down."""
    rng = random.Random(4)
    with catalog.begin() as session:
        _setup_app(session)
        state = AppState.UNMANAGED
        for _ in range(120):
            operation = rng.choice(allowed_operations(state))
            step = q.record_transition(session, app="db", operation=operation)
            assert step.to_state is TRANSITIONS[(state, operation)]
            state = step.to_state
        steps = q.list_transitions(session, app="db")
    assert len(steps) == 120
    for before, after in itertools.pairwise(steps):
        assert after.from_state is before.to_state
        assert after.epoch >= before.epoch
    assert steps[-1].to_state is state


def test_writer_epoch_only_goes_up(catalog: Catalog) -> None:
    with catalog.begin() as session:
        _setup_app(session)
        assert q.set_writer_epoch(session, name="db", epoch=5).writer_epoch == 5
        assert q.set_writer_epoch(session, name="db", epoch=3).writer_epoch == 5


# --- images ---------------------------------------------------------------------------------


def test_images_newest_first_with_kind_filter(catalog: Catalog) -> None:
    with catalog.begin() as session:
        _setup_app(session)
        _setup_app(session, "web")
        made: list[Image] = []
        for i, kind in enumerate(
            [ImageKind.SNAPSHOT, ImageKind.SNAPSHOT, ImageKind.SYNCBACK, ImageKind.SNAPSHOT]
        ):
            image = q.add_image(
                session,
                app="db",
                kind=kind,
                manifest=MANIFEST,
                size=100 * i,
                label=f"L{i}",
                created=T0 + timedelta(minutes=i),
                parent_id=made[-1].id if made else None,
            )
            made.append(image)
        q.add_image(session, app="web", kind=ImageKind.SNAPSHOT, manifest=MANIFEST)
    with catalog.read() as session:
        all_db = q.list_images(session, app="db")
        assert [i.id for i in all_db] == [i.id for i in reversed(made)]
        snaps = q.list_images(session, app="db", kind=ImageKind.SNAPSHOT)
        assert [i.label for i in snaps] == ["L3", "L1", "L0"]
        both = q.list_images(session, app="db", kind=[ImageKind.SYNCBACK, ImageKind.REPLICA])
        assert [i.label for i in both] == ["L2"]
        latest = q.latest_image(session, app="db", kind=ImageKind.SNAPSHOT)
        assert latest is not None and latest.label == "L3"
        assert q.latest_image(session, app="db", kind=ImageKind.REPLICA) is None
        app = q.get_app(session, name="db")
        assert app.last_capture == T0 + timedelta(minutes=3)
        assert app.last_replicated is None
    # The image carries its app's name even after the session is gone (CLI JSON "app").
    assert all_db[0].app.name == "db"
    assert all_db[0].id.startswith("img_")
    assert all_db[0].state is ImageState.READY
    assert all_db[0].epoch == 1


def test_image_lineage_survives_deletion(catalog: Catalog) -> None:
    with catalog.begin() as session:
        _setup_app(session)
        base = q.add_image(session, app="db", kind=ImageKind.REPLICA, manifest=MANIFEST)
        child = q.add_image(
            session,
            app="db",
            kind=ImageKind.TEST_FAILOVER,
            manifest=MANIFEST,
            parent_id=base.id,
            source_image_id="img_onthepeer1",
        )
        with pytest.raises(NotFound):
            q.add_image(
                session, app="db", kind=ImageKind.MOUNT, manifest=MANIFEST, parent_id="img_zz"
            )
    with catalog.begin() as session:
        q.delete_image(session, image_id=base.id)
    with catalog.read() as session:
        again = q.get_image(session, image_id=child.id)
        assert again.parent_id is None
        assert again.source_image_id == "img_onthepeer1"
        assert q.get_app(session, name="db").last_replicated is not None


def test_image_presentation_state(catalog: Catalog) -> None:
    with catalog.begin() as session:
        _setup_app(session)
        image = q.add_image(session, app="db", kind=ImageKind.FAILOVER, manifest=MANIFEST)
        q.set_image_state(
            session,
            image_id=image.id,
            state=ImageState.MOUNTED,
            mounted_host="h1",
            mount_point="/mnt/x",
            nbd_export="exp1",
        )
        assert [i.id for i in q.list_images_on_host(session, host="h1")] == [image.id]
        assert [i.id for i in q.list_images_of_kind(session, kind=ImageKind.FAILOVER)] == [image.id]
    with catalog.begin() as session:
        back = q.set_image_state(session, image_id=image.id, state=ImageState.READY)
        assert (back.mounted_host, back.mount_point, back.nbd_export) == (None, None, None)
        q.add_image(
            session, app="db", kind=ImageKind.PROTECTIVE, manifest=MANIFEST, image_id="img_fixed1"
        )
        with pytest.raises(AlreadyExists, match="img_fixed1"):
            q.add_image(
                session, app="db", kind=ImageKind.SNAPSHOT, manifest=MANIFEST, image_id="img_fixed1"
            )
        assert q.get_image(session, image_id="img_fixed1").protective is True


# --- jobs (read side), tokens, peers, settings, audit ---------------------------------------


def test_job_reads_and_log(catalog: Catalog) -> None:
    with catalog.begin() as session:
        for i, (app, status) in enumerate(
            [("db", JobStatus.SUCCEEDED), ("db", JobStatus.QUEUED), ("web", JobStatus.FAILED)]
        ):
            session.add(
                Job(
                    id=f"job_{i}",
                    type="capture",
                    app=app,
                    status=status,
                    created=T0.replace(minute=i),
                )
            )
        session.flush()
        q.add_job_log(session, job_id="job_0", text="first")
        q.add_job_log(session, job_id="job_0", text="second", level="warning")
    with catalog.read() as session:
        assert [j.id for j in q.list_jobs(session)] == ["job_2", "job_1", "job_0"]
        assert [j.id for j in q.list_jobs(session, app="db")] == ["job_1", "job_0"]
        assert [j.id for j in q.list_jobs(session, status=JobStatus.FAILED)] == ["job_2"]
        active = q.list_jobs(session, status=[JobStatus.QUEUED, JobStatus.RUNNING])
        assert [j.id for j in active] == ["job_1"]
        assert [j.id for j in q.list_jobs(session, limit=1)] == ["job_2"]
        lines = q.list_job_log(session, job_id="job_0")
        assert [(line.level, line.text) for line in lines] == [
            ("info", "first"),
            ("warning", "second"),
        ]
        assert q.get_job(session, job_id="job_0").params == {}


def test_job_log_requires_a_job(catalog: Catalog) -> None:
    # Foreign keys are enforced on SQLite too.
    with pytest.raises(IntegrityError), catalog.begin() as session:
        q.add_job_log(session, job_id="job_missing", text="x")


def test_tokens_are_stored_hashed(catalog: Catalog) -> None:
    with catalog.begin() as session:
        q.add_token(session, name="ops", token="s3cret-token", role=Role.OPERATOR)
    with catalog.read() as session:
        found = q.find_token(session, token="s3cret-token")
        assert found is not None and found.name == "ops" and found.role is Role.OPERATOR
        assert q.find_token(session, token="wrong") is None
        stored = session.scalars(select(Token.token_sha256)).all()
        assert stored == [q.hash_token("s3cret-token")]
        assert "s3cret-token" not in stored[0]
    with catalog.begin() as session:
        q.remove_token(session, name="ops")
        assert q.list_tokens(session) == []


def test_peers_settings_audit(catalog: Catalog) -> None:
    with catalog.begin() as session:
        q.add_peer(session, name="dr", url="https://dr:8443", token="t", fingerprint="ab:cd")
        assert q.get_setting(session, key="name") is None
        q.set_setting(session, key="name", value="site-a")
        q.set_setting(session, key="name", value="site-b")
        q.add_audit(session, actor="ops", role="operator", method="POST", path="/x", status=202)
        q.add_audit(
            session,
            actor=None,
            role=None,
            method="DELETE",
            path="/y",
            status=401,
            detail={"why": "no token"},
        )
    with catalog.read() as session:
        assert q.get_peer(session, name="dr").fingerprint == "ab:cd"
        assert [p.name for p in q.list_peers(session)] == ["dr"]
        assert q.get_setting(session, key="name") == "site-b"
        audit = q.list_audit(session)
        assert [(a.method, a.status, a.detail) for a in audit] == [
            ("DELETE", 401, {"why": "no token"}),
            ("POST", 202, None),
        ]
    with catalog.begin() as session:
        q.remove_peer(session, name="dr")
        assert q.list_peers(session) == []
