"""What a replica-style failback of a VM may name, checked at the DR site before it asks
production and by production on the request (``replica_failback._check_request``), and the
wire model production receives it in. The refusals that need production's hypervisor (a
domain that is not there, a name that is, a missing pool) are in
``tests/e2e/test_vm_failback_targets.py``."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tandem.domain.lifecycle import AppKind
from tandem.errors import InvalidInput
from tandem.operations.replica_failback import _check_request
from tandem.transport.api import FailbackIn
from tandem.transport.peer import FailbackCheck

VM = AppKind.VM


def test_a_vm_target_is_a_host_and_a_domain() -> None:
    assert _check_request("restored", "host1", "web-restored", VM) == "restored"
    assert _check_request("new", "host1", "web-new", VM, "default") == "new"
    assert _check_request("original", None, None, VM) == "original"


@pytest.mark.parametrize(
    ("target", "host", "path", "pool", "says"),
    [
        ("restored", "host1", None, None, "needs --host and --domain"),
        ("restored", None, "web", None, "needs --host and --domain"),
        ("new", "host1", None, None, "and --pool"),
        ("restored", "host1", "/srv/web", None, "is not a libvirt domain name"),
        ("restored", "host1", "web;rm", None, "is not a libvirt domain name"),
        ("new", "host1", "web-new", None, "needs --pool (the storage pool"),
        ("restored", "host1", "web", "default", "takes no --pool: it is for --target new"),
        ("original", None, None, "default", "--target original"),
        ("original", "host1", "web", None, "--target original"),
    ],
)
def test_a_vm_target_is_refused_naming_the_fix(
    target: str, host: str | None, path: str | None, pool: str | None, says: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        _check_request(target, host, path, VM, pool)
    assert says in refused.value.message


def test_other_apps_keep_full_paths_and_take_no_pool() -> None:
    assert _check_request("new", "host1", "/srv/new", AppKind.VOLUME) == "new"
    with pytest.raises(InvalidInput, match="a full path"):
        _check_request("restored", "host1", "web", AppKind.FILESYSTEM)
    with pytest.raises(InvalidInput, match="takes no --pool: it is for --target new of a vm app"):
        _check_request("new", "host1", "/srv/new", AppKind.VOLUME, "default")


def test_the_wire_takes_a_domain_name_or_a_full_path_and_a_pool_name() -> None:
    check = FailbackCheck(target="new", host="host1", path="web-new", epoch=2, pool="default")
    assert (check.path, check.pool) == ("web-new", "default")
    assert FailbackCheck(target="restored", host="h", path="/srv/x", epoch=1).path == "/srv/x"
    for bad in ({"path": "../etc"}, {"path": "a b"}, {"pool": "../pool"}, {"pool": "x" * 80}):
        with pytest.raises(ValidationError):
            FailbackCheck.model_validate(
                {"target": "new", "host": "h", "path": "web", "epoch": 1, **bad}
            )
    with pytest.raises(ValidationError):
        FailbackIn(target="new", pool="a/b")
