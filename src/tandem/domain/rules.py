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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from tandem.domain.images import ImageKind
from tandem.domain.lifecycle import AppState
from tandem.errors import ConfirmationOutOfOrder, ConfirmationRequired, Conflict, InvalidInput

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
        raise InvalidInput(
            detail=(
                f"application {app!r} is the VM {source_host!r}; it cannot be failed over "
                "onto the VM it came from. Choose another host or a new VM"
            )
        )


def _withdraw_first(image_id: str) -> str:
    # A presented image cannot be deleted (`image delete` refuses a mounted one): the fix
    # names both steps, in the order they work.
    return (
        f"Unmount it, then delete it: `tandem unmount {image_id}`, "
        f"then `tandem image delete {image_id}`"
    )


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
            raise Conflict(
                detail=(
                    f"application {app!r} already has the test-failover image {image.image_id} "
                    f"on host {image.host!r}; an image is tested on one host at a time. "
                    f"{_withdraw_first(image.image_id)}"
                )
            )
    for image in existing:
        if image.host == target_host:
            raise Conflict(
                detail=(
                    f"host {target_host!r} already carries the test-failover image "
                    f"{image.image_id} of application {image.app!r}; a host takes one "
                    f"test-failover image at a time. {_withdraw_first(image.image_id)}, "
                    "or choose another host"
                )
            )


def check_image_deletable(*, image_id: str, kind: ImageKind, app: str, app_state: AppState) -> None:
    """Refuse to delete an image that holds the only copy of live data or the way back."""
    if kind is ImageKind.FAILOVER and app_state in (
        AppState.FAILED_OVER,
        AppState.FAILBACK_PENDING,
    ):
        raise Conflict(
            detail=(
                f"image {image_id} is the failed-over copy that application {app!r} runs on; "
                "deleting it would lose the data written at the DR site. Fail back first"
            )
        )
    if kind is ImageKind.PROTECTIVE and app_state is AppState.FAILBACK_PENDING:
        raise Conflict(
            detail=(
                f"image {image_id} is the protective snapshot of the pending failback of "
                f"application {app!r}. Commit or undo the failback first"
            )
        )


def check_writer_epoch(*, app: str, carried: int, current: int) -> None:
    """Refuse data that carries a writer epoch older than the app's (split-brain fencing)."""
    if carried < current:
        raise Conflict(
            detail=(
                f"the data for application {app!r} carries writer epoch {carried}, but the "
                f"application is at epoch {current} since a failover; the sender is no longer "
                "the writer. Fail back before replicating or restoring from that site"
            )
        )
