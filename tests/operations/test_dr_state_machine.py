"""The DR lifecycle as a state machine: random sequences of operations on two live sites.

Hypothesis drives captures and writes at production, test failovers, failover, writes at the
DR site (and stray ones while a replica-style failback is pending), syncbacks, restores of
syncback images, snapshot-style failback (with and without --force), replica-style failback
to the original with commit (with and without --force) or undo, against two real
appliances and agents in-process (``two_sites``). A model predicts each outcome; after
every step these invariants are checked:

(a) never two writable copies feeding replication: while the app is failed over (or its
    failback is pending) the DR appliance refuses replication from production's current
    epoch; while it is managed there, it accepts it, refuses an older epoch, and no failed-
    over copy is presented;
(b) no acknowledged write is lost: every record the model wrote is in the copy that is
    authoritative now (production's data, or the DR copy while failed over), unless a step
    explicitly discarded it (--force, undo) and the model says so;
(c) every DR operation illegal in the current state is refused with ``InvalidTransition``
    naming exactly the allowed operations.

Each example is one new app (a file tree or a volume) on the same two sites, so the sites
are built once. Derandomized and without an example database: CI runs the same
sequences every time (about a minute on 2 cores, with the scenarios). One rule draws the
next operation from weighted lists (``ACTIONS``), some of them short sequences that make
the moments where data gets lost likely (a write after the final syncback, a write to the
DR copy while a failback is pending). ``SCENARIO`` walks through every outcome of
``MUST_SEE`` for both kinds of app with the same model and invariants, so what the random
sequences happen to reach is never all that is tested.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tandem.catalog import queries as q
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind, AppState, Operation, allowed_operations
from tandem.domain.rules import RESTORE_CONFIRMATIONS
from tandem.errors import (
    Conflict,
    CopyFrozen,
    InvalidTransition,
    StaleEpoch,
    TandemError,
    TransitionRefused,
    UnsyncedWrites,
)
from tandem.operations import (
    apps,
    capture,
    failback,
    failover,
    images,
    mount,
    replica_failback,
    replicate,
    restore,
    syncback,
    testfailover,
)
from tandem.storage.overlay import BLOCK, Overlay
from tandem.transport.api import FailbackIn, FailoverIn, PresentIn
from tandem.transport.peer import ImageOffer, MirroredApp, ReplicationOpen
from tests.operations.two_sites import TEMPLATE, TwoSites, two_sites

M, F, P = AppState.MANAGED, AppState.FAILED_OVER, AppState.FAILBACK_PENDING
VOLUME_SIZE = 8 * 1024 * 1024  # two 4 MiB chunks, 128 record slots of one block each
RECORD = 64  # bytes of a record in its volume slot
SLOTS = VOLUME_SIZE // BLOCK
EXAMPLES = int(os.environ.get("TANDEM_SM_EXAMPLES", "10"))
STEPS = int(os.environ.get("TANDEM_SM_STEPS", "20"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=True,
    database=None,
    # A failure prints its steps; shrinking would re-run whole DR drills for many minutes.
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
NAMES = itertools.count(1)
SEEN: Counter[str] = Counter()
"""What the steps of the last run did (each also a hypothesis ``event``)."""
MUST_SEE = (
    "failover of a filesystem",
    "failover of a volume",
    "failback: clean",
    "failback: TransitionRefused",
    "failback: Conflict",
    "failback: UnsyncedWrites",
    "failback --force: UnsyncedWrites",
    "commit: clean",
    "commit: stray",
    "commit --force: stray",
    "undo: clean",
    "undo: stray",
)
"""The outcomes the scenarios (and mostly the random sequences too) reach."""
READ_ONLY = "stray write refused: the DR volume is read-only"


def seen(what: str) -> None:
    SEEN[what] += 1
    if currently_in_test_context():
        event(what)


ACTIONS: dict[AppState, list[str]] = {
    AppState.MANAGED: [
        "failover",
        "write at production",
        "write at production",
        "test failover",
        "capture at production",
    ],
    AppState.FAILED_OVER: [
        "write at DR",
        "syncback and restore",
        "failback",
        "late write at DR, then failback",
        "failback --target original",
        "syncback",
        "restore oldest syncback",
        "write at DR",
        "late write at DR, then failback --force",
        "failback --force",
        "restore newest syncback",
        "capture at production",
    ],
    AppState.FAILBACK_PENDING: [
        "commit-failback",
        "undo-failback",
        "stray write at DR, then commit-failback",
        "write at production",
        "stray write at DR, then undo-failback",
        "commit-failback --force",
        "stray write at DR",
        "capture at production",
    ],
}


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoSites]:
    with two_sites(tmp_path_factory.mktemp("sm")) as built:
        yield built


SCENARIO = [
    # a drill, then the snapshot style: every refusal on the way, then the clean failback
    "write at production",
    "test failover",
    "failover",
    "write at DR",
    "failback",  # no syncback yet
    "syncback",
    "failback",  # production has not restored it
    "restore newest syncback",
    "write at DR",
    "failback",  # written after the syncback production restored
    "failback --target original",  # (the replica style from here)
    "stray write at DR",
    "commit-failback",  # written after the protective snapshot
    "undo-failback",  # back to the protective snapshot, without the stray write
    "write at DR",
    "failback --target original",
    "write at production",
    "commit-failback",
    "capture at production",  # mirroring resumed
    "failover",
    "failback --target original",
    "stray write at DR",
    "commit-failback --force",  # the stray write is discarded on purpose
    "failover",
    "failback --target original",
    "undo-failback",
    "late write at DR, then failback --force",
    "failover",
    "late write at DR, then failback",
    "syncback and restore",
    "failback",
]
"""Every outcome of ``MUST_SEE`` in one sequence: the random sequences need not find them."""


@pytest.mark.parametrize("kind", [AppKind.FILESYSTEM, AppKind.VOLUME], ids=lambda k: k.value)
def test_dr_lifecycle_scenario(sites: TwoSites, kind: AppKind) -> None:
    SEEN.clear()
    machine = DrMachine(sites)
    machine.protect(kind)
    machine.check()
    steps = SCENARIO
    if kind is AppKind.VOLUME:  # a stray write is refused: the commit after it would pass
        steps = [
            a
            for i, a in enumerate(SCENARIO)
            if not (a == "commit-failback" and SCENARIO[i - 1] == "stray write at DR")
        ]
    for action in steps:
        machine.do(action)
        machine.check()
    due = [w for w in MUST_SEE if not w.startswith("failover of") or w.endswith(kind.value)]
    if kind is AppKind.VOLUME:  # its DR copy is read-only while the failback is pending
        due = [w for w in due if "stray" not in w] + [READ_ONLY]
    missed = [what for what in due if not SEEN[what]]
    assert not missed, f"the scenario no longer reaches {missed}"


def test_dr_lifecycle_state_machine(sites: TwoSites) -> None:
    SEEN.clear()
    machine = lambda: DrMachine(sites)  # noqa: E731  (hypothesis takes any factory)
    run_state_machine_as_test(machine, settings=SETTINGS)  # type: ignore[arg-type]
    print(dict(SEEN))  # with -s: what the random sequences did


class DrMachine(RuleBasedStateMachine):
    def __init__(self, sites: TwoSites) -> None:
        super().__init__()
        self.s = sites
        self.prod, self.dr = sites.prod.site, sites.dr.site
        # the model
        self.name = ""
        self.kind = AppKind.FILESYSTEM
        self.state = M
        self.written = 0  # records are numbered 1, 2, ...
        self.expected: set[int] = set()  # must be in the authoritative copy
        self.prod_has: set[int] = set()  # what production's data holds
        self.dr_has: set[int] = set()  # what the DR copy holds (failed over / pending)
        self.syncbacks: list[tuple[str, frozenset[int]]] = []  # since the failover, oldest first
        self.newest_restored = False  # production restored the newest syncback last
        self.dr_changed = False  # the DR copy changed since the newest syncback
        self.protective: frozenset[int] = frozenset()
        self.stray: set[int] = set()  # written to the DR copy while the failback is pending
        self.failover_image = ""
        self.dr_path = Path()
        self.failovers = 0
        self.tests = 0

    # --- data access -------------------------------------------------------------------

    @property
    def prod_path(self) -> Path:
        root = self.s.root / self.name
        return root / ("prod.img" if self.kind is AppKind.VOLUME else "prod")

    def text(self, n: int) -> str:
        return f"{self.name}:{n}"

    def overlay(self) -> Overlay:
        return self.dr.overlays[self.failover_image]

    def write_record(self, where: str, n: int) -> None:
        """Write record ``n`` at production or into the DR copy, acknowledged (durable)."""
        data = self.text(n).encode().ljust(RECORD, b".")
        if self.kind is AppKind.VOLUME:
            if where == "dr":
                self.overlay().write(n * BLOCK, data)
                self.overlay().flush()
            else:
                with open(self.prod_path, "r+b") as fh:
                    fh.seek(n * BLOCK)
                    fh.write(data)
                    os.fsync(fh.fileno())
            return
        root = self.dr_path if where == "dr" else self.prod_path
        (root / "rec" / f"{n}.txt").write_text(self.text(n))
        with open(root / "log.txt", "a") as fh:
            fh.write(self.text(n) + "\n")

    def records_in(self, where: str) -> set[int]:
        """The records the copy holds now."""
        found: set[int] = set()
        if self.kind is AppKind.VOLUME:
            for n in range(1, self.written + 1):
                if where == "dr":
                    data = self.overlay().read(n * BLOCK, RECORD)
                else:
                    with open(self.prod_path, "rb") as fh:
                        fh.seek(n * BLOCK)
                        data = fh.read(RECORD)
                if data.rstrip(b".") == self.text(n).encode():
                    found.add(n)
            return found
        root = self.dr_path if where == "dr" else self.prod_path
        lines = set((root / "log.txt").read_text().splitlines())
        for n in range(1, self.written + 1):
            rec = root / "rec" / f"{n}.txt"
            if self.text(n) in lines and rec.exists() and rec.read_text() == self.text(n):
                found.add(n)
        return found

    def new_records(self, count: int, where: str) -> set[int]:
        made = set()
        for _ in range(count):
            self.written += 1
            self.write_record(where, self.written)
            made.add(self.written)
        return made

    # --- running operations ------------------------------------------------------------

    def run_prod(self, job: Any) -> Any:
        return self.s.run(self.s.prod, job)

    def run_dr(self, job: Any) -> Any:
        return self.s.run(self.s.dr, job)

    def dr_state(self) -> AppState:
        return apps.get_app(self.dr, name=self.name).state

    def capture_and_replicate(self) -> bool:
        """Capture at production; return whether the DR site took the replica."""
        done = self.run_prod(capture.submit_capture(self.prod, app=self.name, actor="model"))
        assert done.status is JobStatus.SUCCEEDED, done.message
        mirror = done.result["mirror_job"]
        if mirror is None:  # production knows the app is failed over at the peer
            assert apps.get_app(self.prod, name=self.name).peer_active
            assert self.state is not M
            return False
        sent = self.s.prod.runner.wait(mirror, timeout=60)
        if sent.status is JobStatus.SUCCEEDED:
            held = replicate.replicas_held(self.dr, peer="prod", app=self.name).images
            assert done.image in held, (done.image, held)
            return True
        assert sent.status is JobStatus.FAILED, sent.status
        return False

    # --- rules -------------------------------------------------------------------------

    @initialize(kind=st.sampled_from([AppKind.FILESYSTEM, AppKind.VOLUME]))
    def protect(self, kind: AppKind) -> None:
        self.name = f"app{next(NAMES)}"  # a new app each example: the sites are shared
        self.kind = kind
        (self.s.root / self.name).mkdir()
        if kind is AppKind.VOLUME:
            with open(self.prod_path, "wb") as fh:
                fh.truncate(VOLUME_SIZE)
        else:
            (self.prod_path / "rec").mkdir(parents=True)
            (self.prod_path / "log.txt").write_text("")
        apps.add_app(self.prod, name=self.name, host="host1", kind=kind, path=str(self.prod_path))
        apps.protect_app(self.prod, name=self.name, template=TEMPLATE, actor="model")
        made = self.new_records(1, "prod")
        self.expected |= made
        self.prod_has |= made
        assert self.capture_and_replicate()

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """One operation among those that make sense now, drawn with the weights of
        ``ACTIONS`` (one rule rather than many: hypothesis' swarm testing would switch
        whole rules off per example, and a weight says what a DR drill does most)."""
        self.do(data.draw(st.sampled_from(ACTIONS[self.state]), label="action"))

    def do(self, action: str) -> None:
        assert action in ACTIONS[self.state], (action, self.state)
        seen(action)
        count = 1 + self.written % 2
        actions: dict[str, Callable[[], None]] = {
            "write at production": lambda: self.write_at_production(count),
            "capture at production": self.capture_at_production,
            "test failover": self.test_failover_and_delete,
            "failover": self.fail_over,
            "write at DR": lambda: self.write_at_dr(count),
            "syncback": self.take_syncback,
            "syncback and restore": self.final_syncback_and_restore,
            "restore newest syncback": lambda: self.restore_syncback(oldest=False),
            "restore oldest syncback": lambda: self.restore_syncback(oldest=True),
            "failback": lambda: self.snapshot_failback(force=False),
            "failback --force": lambda: self.snapshot_failback(force=True),
            "failback --target original": self.replica_failback,
            "stray write at DR": self.stray_write_at_dr,
            "commit-failback": lambda: self.commit_failback(force=False),
            "commit-failback --force": lambda: self.commit_failback(force=True),
            "undo-failback": self.undo_failback,
        }
        # the moments that lose data when a check is missing, made likely: a write after
        # the final syncback was restored, a write to the DR copy while it should be off
        actions["late write at DR, then failback"] = _then(
            self.final_syncback_and_restore, actions["write at DR"], actions["failback"]
        )
        actions["late write at DR, then failback --force"] = _then(
            self.final_syncback_and_restore, actions["write at DR"], actions["failback --force"]
        )
        actions["stray write at DR, then commit-failback"] = _then(
            self.stray_write_at_dr, actions["commit-failback"]
        )
        actions["stray write at DR, then undo-failback"] = _then(
            self.stray_write_at_dr, self.undo_failback
        )
        actions[action]()

    def write_at_production(self, count: int) -> None:
        if self.written + count >= SLOTS:
            return
        made = self.new_records(count, "prod")
        self.prod_has |= made
        self.expected |= made  # in P: kept by a commit, dropped (explicitly) by an undo

    def capture_at_production(self) -> None:
        took = self.capture_and_replicate()
        # (a): the DR site takes replicas only while production is the writer
        assert took == (self.state is M), (self.state, took)

    def test_failover_and_delete(self) -> None:
        if self.tests:  # one drill per app is enough
            return
        mount_point = None
        self.tests += 1
        if self.kind is AppKind.FILESYSTEM:
            mount_point = str(self.s.root / self.name / f"test{self.tests}")
        asked = PresentIn(host="host2", mount_point=mount_point)
        job = testfailover.submit(self.dr, self.name, asked, "model")
        done = self.run_dr(job)
        assert done.status is JobStatus.SUCCEEDED, done.message
        image = done.result["image"]
        if self.kind is AppKind.VOLUME:
            self.dr.overlays[image].write(BLOCK, b"scribbled on the test copy")
        else:
            (Path(str(mount_point)) / "log.txt").write_text("scribbled on the test copy\n")
        mount.unmount(self.dr, image=image)
        deleted = self.run_dr(images.submit_delete(self.dr, image_id=image, actor="model"))
        assert deleted.status is JobStatus.SUCCEEDED, deleted.message
        assert self.capture_and_replicate()  # replication went on

    def fail_over(self) -> None:
        assert self.capture_and_replicate()  # a planned failover: the newest data goes along
        self.failovers += 1
        mount_point = None
        if self.kind is AppKind.FILESYSTEM:
            self.dr_path = self.s.root / self.name / f"dr{self.failovers}"
            mount_point = str(self.dr_path)
        asked = FailoverIn(host="host2", confirm=["FAILOVER"], mount_point=mount_point)
        job = failover.submit(self.dr, self.name, asked, "model")
        done = self.run_dr(job)
        assert done.status is JobStatus.SUCCEEDED, done.message
        self.failover_image = done.result["image"]
        seen(f"failover of a {self.kind.value}")
        self.state = F
        self.dr_has = set(self.prod_has)
        self.syncbacks = []
        self.newest_restored = False
        self.dr_changed = False

    def write_at_dr(self, count: int) -> None:
        if self.written + count >= SLOTS:
            return
        made = self.new_records(count, "dr")
        self.dr_has |= made
        self.expected |= made
        self.dr_changed = True

    def stray_write_at_dr(self) -> None:
        """The DR copy should be off while the failback is pending; something writes anyway."""
        if self.written + 1 >= SLOTS:
            return
        if self.kind is AppKind.VOLUME:
            with pytest.raises(CopyFrozen):
                self.overlay().write((self.written + 1) * BLOCK, b"stray")
            seen(READ_ONLY)
            return
        made = self.new_records(1, "dr")
        self.dr_has |= made
        self.stray |= made

    def take_syncback(self) -> None:
        done = self.run_dr(syncback.submit_syncback(self.dr, app=self.name, actor="model"))
        assert done.status is JobStatus.SUCCEEDED, done.message
        self.syncbacks.append((done.result["image"], frozenset(self.dr_has)))
        self.newest_restored = False
        self.dr_changed = False

    def final_syncback_and_restore(self) -> None:
        """The usual way home: a syncback, restored at production at once."""
        self.take_syncback()
        self.restore(len(self.syncbacks) - 1)

    def restore_syncback(self, oldest: bool) -> None:
        if self.syncbacks:
            self.restore(0 if oldest else len(self.syncbacks) - 1)

    def restore(self, which: int) -> None:
        newest = len(self.syncbacks) - 1
        image, holds = self.syncbacks[which]
        job = restore.submit_restore(
            self.prod, app=self.name, image=image, confirm=RESTORE_CONFIRMATIONS, actor="model"
        )
        done = self.run_prod(job)
        assert done.status is JobStatus.SUCCEEDED, done.message
        self.prod_has = set(holds)
        self.newest_restored = which == newest
        seen(f"restore of the {'newest' if which == newest else 'oldest'} syncback")
        assert self.records_in("prod") >= holds

    def snapshot_failback(self, force: bool) -> None:
        if not self.syncbacks:
            why: type[TandemError] | None = TransitionRefused
        elif not self.newest_restored:
            why = Conflict
        elif self.dr_changed:
            why = UnsyncedWrites
        else:
            why = None
        refused = self.outcome(
            lambda: failback.submit_failback(self.dr, app=self.name, force=force, actor="model")
        )
        seen(f"failback{' --force' if force else ''}: {why.__name__ if why else 'clean'}")
        if why is not None and not force:
            assert refused is not None, f"failback accepted though {why.__name__} was due"
            assert isinstance(refused, why), refused
            if why is UnsyncedWrites:
                assert "tandem syncback" in refused.message and "--force" in refused.message
            assert self.dr_state() is F
            return
        assert refused is None, refused
        if why is not None:  # forced: what only the DR copy held is dropped, explicitly
            self.expected = set(self.prod_has)
        assert self.expected <= self.prod_has
        self.to_managed()

    def replica_failback(self) -> None:
        job = replica_failback.submit(self.dr, self.name, FailbackIn(target="original"), "model")
        done = self.run_dr(job)
        assert done.status is JobStatus.SUCCEEDED, done.message
        with self.dr.catalog.read() as session:
            first = q.latest_image(session, app=self.name, kind=ImageKind.SYNCBACK)
        assert first is not None
        self.syncbacks.append((first.id, frozenset(self.dr_has)))
        self.protective = frozenset(self.dr_has)
        self.prod_has = set(self.dr_has)
        self.newest_restored = False  # production's last restore is the protective snapshot
        self.dr_changed = False
        self.stray = set()
        self.state = P

    def commit_failback(self, force: bool) -> None:
        refused = self.outcome(
            lambda: replica_failback.submit_end(
                self.dr, app=self.name, undo=False, force=force, actor="model"
            )
        )
        seen(f"commit{' --force' if force else ''}: {'stray' if self.stray else 'clean'}")
        if self.stray and not force:
            assert isinstance(refused, UnsyncedWrites), refused
            assert "undo-failback" in refused.message and "--force" in refused.message
            assert self.dr_state() is P
            return
        assert refused is None, refused
        self.to_managed()

    def undo_failback(self) -> None:
        seen(f"undo: {'stray' if self.stray else 'clean'}")
        job = replica_failback.submit_end(self.dr, app=self.name, undo=True, actor="model")
        done = self.run_dr(job)
        assert done.status is JobStatus.SUCCEEDED, done.message
        # explicitly dropped: production's writes while pending, stray writes to the DR copy
        self.expected = set(self.protective)
        self.dr_has = set(self.protective)
        assert not (self.records_in("dr") & self.stray), "undo left stray writes behind"
        self.stray = set()
        self.state = F
        self.dr_changed = False  # the copy is the protective snapshot, equal to "failback 1/2"

    def outcome(self, submit: Callable[[], Any]) -> TandemError | None:
        """Submit and run a DR job; the error that refused it (at submit or in the job)."""
        try:
            job = submit()
        except TandemError as exc:
            return exc
        done = self.run_dr(job)
        if done.status is JobStatus.SUCCEEDED:
            return None
        assert done.status is JobStatus.FAILED, done.status
        for cls in (UnsyncedWrites, Conflict, TransitionRefused):
            if done.message and _matches(cls, done.message):
                return cls(done.message)
        raise AssertionError(f"the job failed for another reason: {done.message}")

    def to_managed(self) -> None:
        self.state = M
        self.syncbacks = []
        self.stray = set()
        self.dr_has = set()
        self.failover_image = ""

    # --- invariants ----------------------------------------------------------------------

    def check(self) -> None:
        """Every invariant (hypothesis runs them after each step by itself)."""
        self.state_is_the_models()
        self.one_writer_feeds_replication()
        self.no_acknowledged_write_is_lost()
        self.illegal_operations_are_refused_naming_the_allowed_ones()

    @invariant()
    def state_is_the_models(self) -> None:
        if self.name:
            assert self.dr_state() is self.state

    @invariant()
    def one_writer_feeds_replication(self) -> None:
        """(a)"""
        if not self.name:
            return
        prod_epoch = apps.get_app(self.prod, name=self.name).writer_epoch
        dr_epoch = apps.get_app(self.dr, name=self.name).writer_epoch
        with self.dr.catalog.read() as session:
            copies = [
                i
                for i in q.list_images(session, app=self.name, kind=ImageKind.FAILOVER)
                if i.state is not ImageState.READY
            ]
        assert prod_epoch <= dr_epoch
        if self.state is M:
            assert copies == [], "a failed-over copy is still presented while managed"
            assert self.probe(prod_epoch) == "accepted"
            if dr_epoch > 1:
                assert self.probe(dr_epoch - 1) == "stale"
        else:
            assert len(copies) == 1 and copies[0].id == self.failover_image
            assert self.probe(prod_epoch) in ("stale", "refused")

    def probe(self, epoch: int) -> str:
        """Would the DR site take a replication carrying ``epoch``? (Nothing is kept.)"""
        app = apps.get_app(self.prod, name=self.name)
        body = ReplicationOpen(
            app=MirroredApp(id=app.id, name=self.name, kind=self.kind),
            image=ImageOffer(
                id="img_probeprobepr",
                created=datetime(2000, 1, 1, tzinfo=UTC),  # older than any replica: never opened
                size=0,
                manifest="00" * 32,
            ),
            epoch=epoch,
        )
        try:
            opened = replicate.open_replication(self.dr, peer="prod", body=body)
        except StaleEpoch:
            return "stale"
        except InvalidTransition:
            return "refused"
        except Conflict as exc:
            assert "older than the newest replica" in exc.message, exc.message
            return "accepted"
        self.dr.sessions.close(self.dr.sessions.find(str(opened.session)))
        return "accepted"

    @invariant()
    def no_acknowledged_write_is_lost(self) -> None:
        """(b)"""
        if not self.name:
            return
        where = "dr" if self.state is F else "prod"
        held = self.records_in(where)
        missing = self.expected - held
        assert not missing, f"records {sorted(missing)} lost from the {where} copy"

    @invariant()
    def illegal_operations_are_refused_naming_the_allowed_ones(self) -> None:
        """(c)"""
        if not self.name:
            return
        allowed = allowed_operations(self.state)
        text = "Allowed operations now: " + ", ".join(op.value for op in allowed) + "."
        submits: dict[Operation, Callable[[], Any]] = {
            Operation.FAILOVER: lambda: failover.submit(
                self.dr, self.name, FailoverIn(host="host2", confirm=["FAILOVER"])
            ),
            Operation.TEST_FAILOVER: lambda: testfailover.submit(
                self.dr, self.name, PresentIn(host="host2")
            ),
            Operation.SYNCBACK: lambda: syncback.submit_syncback(self.dr, app=self.name),
            Operation.FAILBACK: lambda: failback.submit_failback(self.dr, app=self.name),
            Operation.FAILBACK_REPLICA: lambda: replica_failback.submit(
                self.dr, self.name, FailbackIn(target="original")
            ),
            Operation.COMMIT_FAILBACK: lambda: replica_failback.submit_end(
                self.dr, app=self.name, undo=False
            ),
            Operation.UNDO_FAILBACK: lambda: replica_failback.submit_end(
                self.dr, app=self.name, undo=True
            ),
        }
        for op, submit in submits.items():
            if op in allowed:
                continue
            with pytest.raises(InvalidTransition) as info:
                submit()
            assert info.value.message.endswith(text), info.value.message
            assert f"is {self.state.value}; {op.value} is not allowed" in info.value.message


def _then(*steps: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        for step in steps:
            step()

    return run


def _matches(cls: type[TandemError], message: str) -> bool:
    """Whether a failed job's message is the refusal ``cls`` stands for."""
    if cls is UnsyncedWrites:
        return "changed after" in message and "would discard them" in message
    if cls is Conflict:
        return "has not restored the newest syncback" in message
    return message.startswith("Cannot failback")
