"""The application lifecycle: an explicit state machine.

Invariants
- ``TRANSITIONS[(state, operation)]`` is the *only* statement of which operation is legal in
  which state and what state follows it. A pair that is not in the table is illegal:
  ``check_transition`` raises ``InvalidTransition`` naming the state and the operations that
  are allowed in it.
- Guards refine the table with facts the state alone does not carry (is there a replica to
  fail over to, was a syncback taken...). A guard returns a reason (a sentence that ends with
  what to do) or ``None``; a reason refuses the operation with ``TransitionRefused``.
  ``AppFacts`` defaults are the *refusing* values, so an operation that forgets to gather a
  fact is refused rather than allowed.

The states (SPEC §1-§5)::

    UNMANAGED ──protect──▶ MANAGED ──failover──▶ FAILED_OVER ──failback──────────▶ MANAGED
        ▲                   │  ▲                  │    ▲                (snapshot style, §4)
        └────unprotect──────┘  │                  │    └──undo-failback──┐
                               │                  └──failback-replica──▶ FAILBACK_PENDING
                               └─────────────commit-failback────────────────────┘  (§5)

Everything else leaves the state unchanged: capture, replicate and test failover while
managed (§1-§2); syncback while failed over (§4.1, §4.3); restore while managed or failed
over (§4.4 restores the syncback image to production while the app is still failed over);
mount, clone and image deletion in any state (§4.4, §6: images outlive protection, so an
unmanaged app's retained images stay usable and removable).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from tandem.errors import InvalidTransition, TransitionRefused


class AppState(StrEnum):
    """Where an application is in the DR lifecycle."""

    UNMANAGED = "unmanaged"
    MANAGED = "managed"
    FAILED_OVER = "failed-over"
    FAILBACK_PENDING = "failback-pending"


class AppKind(StrEnum):
    """What an application's data is: a file-system tree, a block volume / disk image, or a
    libvirt domain (``vm``: every disk at one instant plus its XML; its ``path`` is the
    domain's name)."""

    FILESYSTEM = "filesystem"
    VOLUME = "volume"
    POSTGRESQL = "postgresql"  # a PostgreSQL cluster: base images (a file tree) plus its WAL
    VM = "vm"  # a libvirt domain: its disks in one volume image (storage.vmimage)


def storage_kind(kind: AppKind) -> str:
    """How an app's images are stored and presented: ``volume`` or ``filesystem`` (a
    PostgreSQL cluster's base images are file trees of its data directory; a VM's disks
    lie in one volume image)."""
    return "volume" if kind in (AppKind.VOLUME, AppKind.VM) else "filesystem"


class Operation(StrEnum):
    """An operation that the lifecycle table decides on."""

    PROTECT = "protect"
    UNPROTECT = "unprotect"
    CAPTURE = "capture"
    REPLICATE = "replicate"
    RESTORE = "restore"
    TEST_FAILOVER = "test-failover"
    FAILOVER = "failover"
    SYNCBACK = "syncback"
    FAILBACK = "failback"
    FAILBACK_REPLICA = "failback-replica"
    COMMIT_FAILBACK = "commit-failback"
    UNDO_FAILBACK = "undo-failback"
    MOUNT = "mount"
    CLONE = "clone"
    DELETE_IMAGE = "delete-image"


_U = AppState.UNMANAGED
_M = AppState.MANAGED
_F = AppState.FAILED_OVER
_P = AppState.FAILBACK_PENDING
_O = Operation

TRANSITIONS: Mapping[tuple[AppState, Operation], AppState] = {
    # §1 protection: a template makes an app managed; applying another one changes it.
    (_U, _O.PROTECT): _M,
    (_M, _O.PROTECT): _M,
    (_M, _O.UNPROTECT): _U,
    (_M, _O.CAPTURE): _M,
    (_M, _O.REPLICATE): _M,
    # §2 test failover: a virtual copy; replication and the state carry on.
    (_M, _O.TEST_FAILOVER): _M,
    # §3 failover: replication stops, the app runs at the DR site.
    (_M, _O.FAILOVER): _F,
    # §4 snapshot-style failback: syncbacks (repeatable), restore, failback.
    (_F, _O.SYNCBACK): _F,
    (_M, _O.RESTORE): _M,
    (_F, _O.RESTORE): _F,
    (_F, _O.FAILBACK): _M,
    # §5 replica-style failback: an intermediate state ended by commit or undo.
    (_F, _O.FAILBACK_REPLICA): _P,
    (_P, _O.COMMIT_FAILBACK): _M,
    (_P, _O.UNDO_FAILBACK): _F,
    # §4.4, §6: image access and clean-up never change the app's state.
    **{(state, op): state for state in AppState for op in (_O.MOUNT, _O.CLONE, _O.DELETE_IMAGE)},
}


FENCING_OPERATIONS: frozenset[Operation] = frozenset({Operation.FAILOVER, Operation.UNDO_FAILBACK})
"""Operations after which the DR site's copy is the writer: the app's writer epoch is raised,
so data still carrying the old epoch (the former writer's) is refused (DESIGN, "Fencing")."""


@dataclass(frozen=True)
class AppFacts:
    """Facts about an app that guards look at, gathered by the operation from the catalog.

    The defaults are the values that make guards refuse (fail closed).
    """

    replica_images: int = 0
    """Replica images of the app held by this appliance."""
    syncbacks_since_failover: int = 0
    """Syncback images sent home since the app failed over."""
    has_protective_image: bool = False
    """A failback protective snapshot of the failed-over copy exists (§5 step 5)."""
    mirrored: bool = False
    """The app's template mirrors captures to the peer appliance."""


Guard = Callable[[AppFacts], str | None]


def _needs_replica(facts: AppFacts) -> str | None:
    if facts.replica_images > 0:
        return None
    return (
        "this appliance holds no replica image of it; run it on the remote appliance, "
        "after a capture has been mirrored there"
    )


def _needs_syncback(facts: AppFacts) -> str | None:
    if facts.syncbacks_since_failover > 0:
        return None
    return (
        "no syncback was taken since the failover, so the data written at the DR site would "
        "be lost when replication resumes; run `tandem syncback APP`, restore the syncback "
        "image, then fail back"
    )


def _needs_protective(facts: AppFacts) -> str | None:
    if facts.has_protective_image:
        return None
    return (
        "the failback protective snapshot is missing, so there is nothing to go back to; "
        "commit the failback instead"
    )


def _needs_mirror(facts: AppFacts) -> str | None:
    if facts.mirrored:
        return None
    return "its template does not mirror; protect it with a template made with --mirror"


GUARDS: Mapping[Operation, Guard] = {
    Operation.TEST_FAILOVER: _needs_replica,
    Operation.FAILOVER: _needs_replica,
    Operation.FAILBACK_REPLICA: _needs_replica,
    Operation.FAILBACK: _needs_syncback,
    Operation.UNDO_FAILBACK: _needs_protective,
    Operation.REPLICATE: _needs_mirror,
}


def allowed_operations(state: AppState) -> list[Operation]:
    """The operations legal in ``state``, sorted by name."""
    return sorted(op for (s, op) in TRANSITIONS if s is state)


def check_transition(
    app_name: str,
    state: AppState,
    operation: Operation,
    facts: AppFacts | None = None,
) -> AppState:
    """Return the state that follows ``operation`` in ``state``, or raise.

    Raises ``InvalidTransition`` when the table has no such transition, and, when ``facts``
    are given, ``TransitionRefused`` with the guard's reason. Without ``facts`` only the table
    is consulted (for callers that merely record a transition already decided on).
    """
    try:
        target = TRANSITIONS[(state, operation)]
    except KeyError:
        allowed = ", ".join(op.value for op in allowed_operations(state)) or "none"
        raise InvalidTransition(
            app=app_name, state=state.value, operation=operation.value, allowed=allowed
        ) from None
    if facts is not None:
        guard = GUARDS.get(operation)
        reason = guard(facts) if guard is not None else None
        if reason is not None:
            raise TransitionRefused(app=app_name, operation=operation.value, reason=reason)
    return target
