from __future__ import annotations

import itertools
import re

import pytest

from tandem.domain.images import ImageKind, ImageState
from tandem.domain.lifecycle import AppState, Operation, allowed_operations
from tandem.domain.rules import (
    FAILOVER_CONFIRMATION,
    RESTORE_CONFIRMATIONS,
    UNMOUNT,
    PresentedImage,
    Role,
    app_operations,
    check_confirmations,
    check_failover_target,
    check_image_deletable,
    check_test_failover_target,
    check_writer_epoch,
    confirmations_accepted,
    image_operations,
    role_allows,
)
from tandem.errors import ConfirmationOutOfOrder, ConfirmationRequired, Conflict, InvalidInput


def test_confirmation_phrases() -> None:
    assert FAILOVER_CONFIRMATION == "FAILOVER"
    assert RESTORE_CONFIRMATIONS == ("DATA LOSS", "OVERWRITE OTHER APPS")


@pytest.mark.parametrize(
    "given",
    [
        ["DATA LOSS", "OVERWRITE OTHER APPS"],
        [" DATA LOSS ", "OVERWRITE OTHER APPS", "FAILOVER"],
        ["OVERWRITE OTHER APPS", "DATA LOSS", "OVERWRITE OTHER APPS"],
    ],
)
def test_restore_confirmations_accepted(given: list[str]) -> None:
    check_confirmations(given, RESTORE_CONFIRMATIONS)


@pytest.mark.parametrize(
    "given",
    [[], ["DATA LOSS"], ["data loss", "overwrite other apps"], ["DATA LOSS OVERWRITE OTHER APPS"]],
)
def test_restore_confirmations_refused(given: list[str]) -> None:
    with pytest.raises(ConfirmationRequired) as info:
        check_confirmations(given, RESTORE_CONFIRMATIONS)
    assert str(info.value) == (
        "This operation destroys or replaces data and needs the typed confirmation(s) "
        '"DATA LOSS" and "OVERWRITE OTHER APPS". Repeat the request with '
        '--confirm "DATA LOSS" --confirm "OVERWRITE OTHER APPS".'
    )
    assert info.value.http_status == 422


def test_restore_confirmations_answer_the_warnings_in_their_order() -> None:
    # SPEC §4.4: "DATA LOSS" and *then* "OVERWRITE OTHER APPS".
    with pytest.raises(ConfirmationOutOfOrder) as info:
        check_confirmations(["OVERWRITE OTHER APPS", "DATA LOSS"], RESTORE_CONFIRMATIONS)
    assert str(info.value) == (
        "The typed confirmations answer warnings given one after the other: type "
        '"DATA LOSS", then "OVERWRITE OTHER APPS", in this order. Repeat the request with '
        '--confirm "DATA LOSS" --confirm "OVERWRITE OTHER APPS".'
    )
    assert info.value.http_status == 422
    assert confirmations_accepted([], RESTORE_CONFIRMATIONS) == 0
    assert confirmations_accepted(["DATA LOSS"], RESTORE_CONFIRMATIONS) == 1
    assert confirmations_accepted(["OVERWRITE OTHER APPS"], RESTORE_CONFIRMATIONS) == 0


def test_failover_confirmation() -> None:
    check_confirmations(["FAILOVER"], [FAILOVER_CONFIRMATION])
    with pytest.raises(ConfirmationRequired, match='--confirm "FAILOVER"'):
        check_confirmations(["failover"], [FAILOVER_CONFIRMATION])


def test_vm_cannot_fail_over_onto_itself() -> None:
    with pytest.raises(InvalidInput, match="onto the VM it came from"):
        check_failover_target(app="web", source_host="vm1", target_host="vm1", is_vm=True)
    check_failover_target(app="web", source_host="vm1", target_host="vm2", is_vm=True)
    # A file-system app may be presented on its own host (at another mount point).
    check_failover_target(app="web", source_host="h1", target_host="h1", is_vm=False)


def test_one_test_failover_image_per_host() -> None:
    existing = [PresentedImage(image_id="img_aaaaaaaaaaaa", app="db", host="dr1")]
    with pytest.raises(Conflict, match="host 'dr1' already carries") as info:
        check_test_failover_target(
            app="web", source_host="p1", target_host="dr1", is_vm=False, test_images=existing
        )
    assert_withdraw_fix_in_order(str(info.value), "img_aaaaaaaaaaaa")
    check_test_failover_target(
        app="web", source_host="p1", target_host="dr2", is_vm=False, test_images=existing
    )


def assert_withdraw_fix_in_order(message: str, image: str) -> None:
    """The fix names the commands that work, in the order they work: a presented image is
    refused by `image delete` until it is unmounted."""
    commands = re.findall(r"`tandem ([^`]+)`", message)
    assert commands == [f"unmount {image}", f"image delete {image}"], message


def test_an_app_is_tested_on_one_host_at_a_time() -> None:
    existing = [PresentedImage(image_id="img_aaaaaaaaaaaa", app="db", host="dr1")]
    with pytest.raises(Conflict, match="one host at a time") as info:
        check_test_failover_target(
            app="db", source_host="p1", target_host="dr2", is_vm=False, test_images=existing
        )
    assert_withdraw_fix_in_order(str(info.value), "img_aaaaaaaaaaaa")


def test_test_failover_target_checks_vm_rule() -> None:
    with pytest.raises(InvalidInput):
        check_test_failover_target(
            app="vm", source_host="vm1", target_host="vm1", is_vm=True, test_images=[]
        )


@pytest.mark.parametrize(
    ("kind", "state", "refused"),
    [
        (ImageKind.FAILOVER, AppState.FAILED_OVER, True),
        (ImageKind.FAILOVER, AppState.FAILBACK_PENDING, True),
        (ImageKind.FAILOVER, AppState.MANAGED, False),
        (ImageKind.PROTECTIVE, AppState.FAILBACK_PENDING, True),
        (ImageKind.PROTECTIVE, AppState.MANAGED, False),
        (ImageKind.SYNCBACK, AppState.FAILED_OVER, False),
        (ImageKind.TEST_FAILOVER, AppState.MANAGED, False),
        (ImageKind.MOUNT, AppState.FAILED_OVER, False),
    ],
)
def test_image_deletable(kind: ImageKind, state: AppState, refused: bool) -> None:
    if refused:
        with pytest.raises(Conflict):
            check_image_deletable(image_id="img_x", kind=kind, app="db", app_state=state)
    else:
        check_image_deletable(image_id="img_x", kind=kind, app="db", app_state=state)


def test_writer_epoch_fencing() -> None:
    check_writer_epoch(app="db", carried=3, current=3)
    check_writer_epoch(app="db", carried=4, current=3)
    with pytest.raises(Conflict, match="epoch 2"):
        check_writer_epoch(app="db", carried=2, current=3)


def test_roles_are_ordered() -> None:
    assert role_allows(Role.ADMIN, Role.OPERATOR)
    assert role_allows(Role.OPERATOR, Role.OPERATOR)
    assert role_allows(Role.OPERATOR, Role.VIEWER)
    assert not role_allows(Role.VIEWER, Role.OPERATOR)
    assert not role_allows(Role.OPERATOR, Role.ADMIN)


# --- what an image offers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app_state", "kind", "image_state", "production", "expected"),
    [
        (AppState.MANAGED, ImageKind.REPLICA, ImageState.READY, False,
         ["test-failover", "failover", "mount", "clone", "delete-image"]),
        (AppState.MANAGED, ImageKind.SNAPSHOT, ImageState.READY, True,
         ["restore", "mount", "clone", "delete-image"]),
        (AppState.MANAGED, ImageKind.SNAPSHOT, ImageState.READY, False,
         ["mount", "clone", "delete-image"]),  # restored only where production runs
        (AppState.FAILED_OVER, ImageKind.FAILOVER, ImageState.MOUNTED, False,
         ["syncback", "failback", "failback-replica"]),  # the copy the app runs on: kept
        (AppState.FAILBACK_PENDING, ImageKind.PROTECTIVE, ImageState.READY, False,
         ["mount", "commit-failback", "undo-failback"]),
        (AppState.MANAGED, ImageKind.FAILOVER, ImageState.MOUNTED, False, ["unmount"]),
        (AppState.MANAGED, ImageKind.TEST_FAILOVER, ImageState.READY, False, ["delete-image"]),
        (AppState.UNMANAGED, ImageKind.SNAPSHOT, ImageState.READY, True,
         ["mount", "clone", "delete-image"]),  # images outlive protection
        (AppState.MANAGED, ImageKind.SNAPSHOT, ImageState.DELETING, True, []),
    ],
)  # fmt: skip
def test_image_operations_follow_the_lifecycle_and_the_image(
    app_state: AppState,
    kind: ImageKind,
    image_state: ImageState,
    production: bool,
    expected: list[str],
) -> None:
    offered = image_operations(
        app_state=app_state, kind=kind, image_state=image_state, production=production
    )
    assert [str(op) for op in offered] == expected


def test_an_image_offers_only_what_the_lifecycle_allows_and_never_deletes_a_kept_one() -> None:
    for app_state, kind, image_state, production in itertools.product(
        AppState, ImageKind, ImageState, (False, True)
    ):
        offered = image_operations(
            app_state=app_state, kind=kind, image_state=image_state, production=production
        )
        allowed = set(allowed_operations(app_state))
        assert all(op == UNMOUNT or op in allowed for op in offered)
        if Operation.DELETE_IMAGE in offered:
            check_image_deletable(image_id="img_x", kind=kind, app="web", app_state=app_state)
            assert image_state is not ImageState.MOUNTED
        assert (UNMOUNT in offered) <= (image_state is ImageState.MOUNTED)


def test_an_app_offers_a_capture_where_it_runs_while_managed() -> None:
    assert app_operations(app_state=AppState.MANAGED, production=True) == [Operation.CAPTURE]
    assert app_operations(app_state=AppState.MANAGED, production=False) == []
    assert app_operations(app_state=AppState.FAILED_OVER, production=True) == []
