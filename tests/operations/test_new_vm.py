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
