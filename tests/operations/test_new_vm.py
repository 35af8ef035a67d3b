"""The new VM a presentation of a ``vm`` app defines is checked before anything is made."""

from __future__ import annotations

import pytest

from tandem.catalog.models import App
from tandem.domain.lifecycle import AppKind
from tandem.errors import InvalidInput
from tandem.operations.present import check_new_vm


def test_a_new_vm_is_never_the_domain_the_image_came_from() -> None:
    """Guards ``check_new_vm``'s source-domain refusal (the fast unit twin of
    ``tests/e2e/test_vms.py``; the agent refuses it again in ``agent.vm.define``)."""
    app = App(name="vm1", kind=AppKind.VM, host="h1", path="web-01")
    with pytest.raises(InvalidInput, match="never failed over onto the domain it came from"):
        check_new_vm(app, "web-01", None, False, keep_identity=False)
    chosen = check_new_vm(app, "web-01-dr", None, False, keep_identity=False)
    assert chosen is not None and chosen.name == "web-01-dr"


def test_an_existing_vm_is_checked_and_needs_its_confirmation() -> None:
    """``--vm DOMAIN``: not the source domain, not with the new-VM options, and the typed
    confirmation REPLACE VM (after FAILOVER for a failover); the request round-trips through
    the job's params."""
    from tandem.domain.rules import FAILOVER_CONFIRMATION
    from tandem.errors import ConfirmationRequired, VmOptionsUnused
    from tandem.operations.present import (
        NewVm,
        PresentParams,
        check_action,
        check_vm_confirmed,
        vm_with_action,
    )

    def round_trip(vm: NewVm) -> NewVm | None:  # as a job stores its params and reads them
        stored = PresentParams(host="h2", action="map-only", **vm.as_params()).stored()
        return PresentParams.model_validate(stored).vm()

    app = App(name="vm1", kind=AppKind.VM, host="h1", path="web-01")
    with pytest.raises(InvalidInput, match="never failed over onto the domain it came from"):
        check_new_vm(app, None, None, False, keep_identity=False, vm="web-01")
    with pytest.raises(InvalidInput, match="not both"):
        check_new_vm(app, "x", None, False, keep_identity=False, vm="other")
    with pytest.raises(InvalidInput, match="keeps its own NICs"):
        check_new_vm(app, None, "default", False, keep_identity=False, vm="other")
    with pytest.raises(InvalidInput, match="existing domain"):
        check_new_vm(app, "x", None, False, keep_identity=False, shutdown_timeout=5)
    chosen = check_new_vm(
        app, None, None, True, keep_identity=False, vm="other", shutdown_timeout=7
    )
    assert chosen is not None and chosen.existing and chosen.name == "other"
    assert round_trip(chosen) == chosen
    now = check_new_vm(app, None, None, False, keep_identity=False, vm="o", shutdown_timeout=0)
    assert now is not None and round_trip(now) == now  # 0: power off now
    with pytest.raises(ConfirmationRequired, match="REPLACE VM"):
        check_vm_confirmed(chosen, [])
    check_vm_confirmed(chosen, ["REPLACE VM"])
    with pytest.raises(ConfirmationRequired, match='"FAILOVER" and "REPLACE VM"'):
        check_vm_confirmed(chosen, [FAILOVER_CONFIRMATION], FAILOVER_CONFIRMATION)
    check_vm_confirmed(chosen, [FAILOVER_CONFIRMATION, "REPLACE VM"], FAILOVER_CONFIRMATION)
    check_vm_confirmed(check_new_vm(app, "x", None, False, keep_identity=False), [])
    with pytest.raises(InvalidInput, match="Drop --action copy"):
        vm_with_action(app, chosen, "copy")
    # A mount point mounts the disks' file systems: never with a VM running on them.
    assert check_action(app, None, "/mnt/x") == "specify"
    with pytest.raises(InvalidInput, match="never both"):
        vm_with_action(app, chosen, "specify")
    other = App(name="v", kind=AppKind.VOLUME, host="h1", path="/dev/x")
    with pytest.raises(VmOptionsUnused, match="--vm"):
        check_new_vm(other, None, None, False, keep_identity=False, vm="d")
