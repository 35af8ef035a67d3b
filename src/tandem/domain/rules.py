"""Rules of SPEC §2-§6 that do not depend on the lifecycle state, as pure checks.

Each ``check_*`` function returns ``None`` when the rule holds and raises the ``TandemError``
that tells the operator what to do otherwise. The caller gathers the facts (catalog rows) and
the server calls these checks itself: a client's checks are a courtesy, never the guard.

Rules
- At most one test-failover image per host, and an app's test failover is presented on one
  host at a time (SPEC §2: "an image can go to host A or host B, not both").
- A VM is never failed over (test or real) onto the VM it came from (SPEC §2).
- Destructive operations carry their typed confirmations: ``FAILOVER`` for failover,
  ``DATA LOSS`` and then ``OVERWRITE OTHER APPS`` for restore (SPEC §3, §4.4). Several
  phrases answer warnings shown one after the other, so they are checked in that order.
- The image an app runs on while failed over, and the protective snapshot of a pending
  replica-style failback, cannot be deleted (they hold the only copy of DR-side writes /
  the only way back).
- Fencing: replication or restore that carries a writer epoch older than the app's current
  one is refused (DESIGN, "Fencing").
- What an image offers (``image_operations``) is a first cut by the lifecycle table and the
  image's kind and state, for the console to show; the operation itself decides on the
  facts when it is asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from tandem.domain.images import WRITABLE_KINDS, ImageKind, ImageState
from tandem.domain.lifecycle import AppState, Operation, allowed_operations
from tandem.errors import (
    ConfirmationOutOfOrder,
    ConfirmationRequired,
    FailoverImageLive,
    ProtectiveSnapshotHeld,
    SameVmTarget,
    SenderNotWriter,
    TestFailoverBusy,
)

FAILOVER_CONFIRMATION = "FAILOVER"
RESTORE_CONFIRMATIONS: tuple[str, ...] = ("DATA LOSS", "OVERWRITE OTHER APPS")
VM_TARGET_CONFIRMATION = "REPLACE VM"
"""Typed to make an existing domain the target (``--vm``): it is powered off and runs from
the image until the image is withdrawn."""


class Role(StrEnum):
    """What a token may do; viewer, operator and admin each include the ones below.

    ``peer`` stands apart: the token the other site's appliance holds, good for the
    replication calls only (and nothing else), which admin may also make.
    """

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"
    PEER = "peer"


_ROLE_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def role_allows(role: Role, needed: Role) -> bool:
    """Whether a token of ``role`` may do what needs ``needed`` (admin ⊇ operator ⊇ viewer)."""
    if role is Role.PEER or needed is Role.PEER:
        return role is needed or role is Role.ADMIN
    return _ROLE_RANK[role] >= _ROLE_RANK[needed]


def confirmations_accepted(given: Sequence[str], required: Sequence[str]) -> int:
    """How many of the ``required`` phrases, from the first, were typed in their order.

    (The console shows the next warning once this many were accepted.)
    """
    typed = [phrase.strip() for phrase in given]
    position = -1
    for count, phrase in enumerate(required):
        if phrase not in typed[position + 1 :]:
            return count
        position = typed.index(phrase, position + 1)
    return len(required)


def check_confirmations(given: Sequence[str], required: Sequence[str]) -> None:
    """Raise ``ConfirmationRequired`` unless every required phrase was typed exactly, in
    the order of ``required`` (``ConfirmationOutOfOrder`` when all are there but not so).

    Surrounding blanks are ignored; case is not (the phrases are typed in capitals on
    purpose). Extra phrases are ignored.
    """
    if confirmations_accepted(given, required) == len(required):
        return
    example = " --confirm ".join(f'"{phrase}"' for phrase in required)
    typed = {phrase.strip() for phrase in given}
    if all(phrase in typed for phrase in required):
        ordered = ", then ".join(f'"{phrase}"' for phrase in required)
        raise ConfirmationOutOfOrder(expected=f"{ordered}, in this order", example=example)
    expected = " and ".join(f'"{phrase}"' for phrase in required)
    raise ConfirmationRequired(expected=expected, example=example)


@dataclass(frozen=True)
class PresentedImage:
    """A test-failover image and the host it is presented to."""

    image_id: str
    app: str
    host: str


def check_failover_target(*, app: str, source_host: str, target_host: str, is_vm: bool) -> None:
    """A VM cannot be (test-)failed over onto the very VM it came from."""
    if is_vm and target_host == source_host:
        raise SameVmTarget(app=app, host=source_host)


def check_test_failover_target(
    *,
    app: str,
    source_host: str,
    target_host: str,
    is_vm: bool,
    test_images: Iterable[PresentedImage],
) -> None:
    """Refuse a test failover of ``app`` onto ``target_host`` that breaks a SPEC §2 rule.

    ``test_images`` are the test-failover images this appliance presents now (any app).
    """
    check_failover_target(app=app, source_host=source_host, target_host=target_host, is_vm=is_vm)
    existing = list(test_images)
    for image in existing:
        if image.app == app:
            raise TestFailoverBusy(
                holder=f"application {app!r}",
                has="has",
                image=image.image_id,
                of=f"on host {image.host!r}",
                rule="an image is tested on one host at a time",
                alternative="",
            )
    for image in existing:
        if image.host == target_host:
            raise TestFailoverBusy(
                holder=f"host {target_host!r}",
                has="carries",
                image=image.image_id,
                of=f"of application {image.app!r}",
                rule="a host takes one test-failover image at a time",
                alternative=", or choose another host",
            )


def image_deletable(*, kind: ImageKind, app_state: AppState) -> bool:
    """Whether an image of ``kind`` may be deleted while its app is in ``app_state``
    (``check_image_deletable`` says why not)."""
    if kind is ImageKind.FAILOVER:
        return app_state not in (AppState.FAILED_OVER, AppState.FAILBACK_PENDING)
    return not (kind is ImageKind.PROTECTIVE and app_state is AppState.FAILBACK_PENDING)


def check_image_deletable(*, image_id: str, kind: ImageKind, app: str, app_state: AppState) -> None:
    """Refuse to delete an image that holds the only copy of live data or the way back."""
    if image_deletable(kind=kind, app_state=app_state):
        return
    if kind is ImageKind.FAILOVER:
        raise FailoverImageLive(image=image_id, app=app)
    raise ProtectiveSnapshotHeld(image=image_id, app=app)


def check_writer_epoch(*, app: str, carried: int, current: int) -> None:
    """Refuse data that carries a writer epoch older than the app's (split-brain fencing)."""
    if carried < current:
        raise SenderNotWriter(what="data", app=app, carried=carried, current=current)


UNMOUNT: Literal["unmount"] = "unmount"
"""Ending a presentation: no job and no lifecycle transition, offered beside the operations."""
ImageOperation = Operation | Literal["unmount"]

RESTORABLE = frozenset({ImageKind.SNAPSHOT, ImageKind.REPLICA, ImageKind.SYNCBACK})
"""The kinds of image that are restored to production and cloned."""
UNMOUNTABLE = frozenset({ImageKind.TEST_FAILOVER, ImageKind.MOUNT, ImageKind.FAILOVER})
"""The kinds of image that are presented to a host, so unmounted."""
_FAILOVER_ONLY = (Operation.SYNCBACK, Operation.FAILBACK, Operation.FAILBACK_REPLICA)
_PENDING_FAILBACK = (Operation.COMMIT_FAILBACK, Operation.UNDO_FAILBACK)


_IMAGE_ORDER: tuple[ImageOperation, ...] = (
    Operation.TEST_FAILOVER,
    Operation.FAILOVER,
    Operation.SYNCBACK,
    Operation.RESTORE,
    Operation.MOUNT,
    UNMOUNT,
    Operation.CLONE,
    Operation.FAILBACK,
    Operation.FAILBACK_REPLICA,
    Operation.COMMIT_FAILBACK,
    Operation.UNDO_FAILBACK,
    Operation.DELETE_IMAGE,
)
"""The order an image's operations are listed in (the lifecycle's)."""


def image_operations(
    *, app_state: AppState, kind: ImageKind, image_state: ImageState, production: bool
) -> list[ImageOperation]:
    """The operations an image of ``kind`` in ``image_state`` allows now, in lifecycle order.

    ``production`` says whether this appliance runs the app's production copy (its host is
    registered here) rather than holding replicas of it: only there is an image restored.
    """
    if image_state is ImageState.DELETING:
        return []
    allowed = set(allowed_operations(app_state))

    def offered(op: ImageOperation) -> bool:
        if op == UNMOUNT:  # not the failed-over copy the app runs on
            in_use = kind is ImageKind.FAILOVER and app_state is not AppState.MANAGED
            return kind in UNMOUNTABLE and image_state is ImageState.MOUNTED and not in_use
        if op not in allowed:
            return False
        if op in (Operation.TEST_FAILOVER, Operation.FAILOVER):
            return kind is ImageKind.REPLICA
        if op in _FAILOVER_ONLY:
            return kind is ImageKind.FAILOVER
        if op is Operation.RESTORE:
            return kind in RESTORABLE and production
        if op is Operation.MOUNT:
            return kind not in WRITABLE_KINDS
        if op is Operation.CLONE:
            return kind in RESTORABLE
        if op in _PENDING_FAILBACK:
            return kind in (ImageKind.FAILOVER, ImageKind.PROTECTIVE)
        if op is Operation.DELETE_IMAGE:
            return image_state is not ImageState.MOUNTED and image_deletable(
                kind=kind, app_state=app_state
            )
        return False  # an operation of the app as a whole

    return [op for op in _IMAGE_ORDER if offered(op)]


def app_operations(*, app_state: AppState, production: bool) -> list[Operation]:
    """The operations of an app as a whole offered now: a capture, where it runs."""
    if production and Operation.CAPTURE in allowed_operations(app_state):
        return [Operation.CAPTURE]
    return []
