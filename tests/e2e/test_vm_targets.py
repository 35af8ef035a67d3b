"""New VMs at DR with a datastore (``--pool``), a copy of their disks (``--action copy``)
and the bad input around them, with a real guest under libvirt (QEMU, TCG) and two real
sites driven by the CLI.

The production guest (``tests/vmguest.py``) formats its disk and prints its md5; a new VM
at DR that prints the same md5 at boot read exactly what production wrote.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import vmguest
from tests.e2e.conftest import Drill, running_drill, wait_for

pytestmark = pytest.mark.slow

DISK_MIB = 48


@dataclass
class Guest:
    name: str
    boot: vmguest.Boot
    sum: str


@dataclass
class Pools:
    active: str
    inactive: str
    path: Path


@pytest.fixture(scope="module")
def guest(libvirt_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    folder = tmp_path_factory.mktemp("guest")
    name = f"tandem-tgt-{folder.name}"
    boot = vmguest.guest_boot(folder)
    disk = vmguest.make_disk(folder / "vda.qcow2", DISK_MIB)
    xml = folder / "domain.xml"
    xml.write_text(vmguest.domain_xml(name, boot, [disk], "tgt1"))
    vmguest.remove_domain(name)
    vmguest.virsh("define", str(xml))
    console = vmguest.start_with_console(name)
    try:
        first = console.expect("TANDEM-SUM").split()[1]
        yield Guest(name, boot, first)
    finally:
        console.close()
        vmguest.remove_domain(name)


@pytest.fixture(scope="module")
def pools(libvirt_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    """A directory pool that runs and one that is defined but not started."""
    folder = tmp_path_factory.mktemp("pools")
    tag = uuid.uuid4().hex[:8]
    active, inactive = f"tandem-pool-{tag}", f"tandem-idle-{tag}"
    (folder / "active").mkdir()
    (folder / "idle").mkdir()
    vmguest.virsh("pool-define-as", active, "dir", "--target", str(folder / "active"))
    vmguest.virsh("pool-start", active)
    vmguest.virsh("pool-define-as", inactive, "dir", "--target", str(folder / "idle"))
    try:
        yield Pools(active, inactive, folder / "active")
    finally:
        for name in (active, inactive):
            vmguest.virsh("pool-destroy", name, check=False)
            vmguest.virsh("pool-undefine", name, check=False)


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    with running_drill(tmp_path_factory.mktemp("vmtargets")) as built:
        yield built


@pytest.fixture(scope="module")
def replica(drill: Drill, guest: Guest) -> dict[str, Any]:
    """The guest protected at production and its first replica at DR."""
    a = drill.a
    a("app", "add", "vmt", "--host", "host1", "--kind", "vm", "--domain", guest.name)
    a("app", "protect", "vmt", "--template", "mirrored")
    snap = a("capture", "vmt")["image"]
    found: dict[str, Any] = wait_for(
        lambda: next((i for i in drill.b("images", "vmt") if i["id"] == snap["id"]), None),
        120,
        "the replica",
    )
    return found


def domain_xml(name: str) -> str | None:
    found = vmguest.virsh("dumpxml", name, check=False)
    return found.stdout if found.returncode == 0 else None


def jobs_of(drill: Drill, kind: str) -> list[dict[str, Any]]:
    return [j for j in drill.b("jobs", "--app", "vmt") if j["type"] == kind]


def test_a_pool_or_network_the_dr_host_lacks_is_refused_at_submit(
    drill: Drill, guest: Guest, pools: Pools, replica: dict[str, Any]
) -> None:
    b = drill.b
    before = len(jobs_of(drill, "test-failover"))
    new = f"{guest.name}-x"
    cases = [
        (("--pool", "no-such-pool"), "has no storage pool 'no-such-pool'"),
        (("--pool", pools.inactive), "(it is inactive)"),
        (("--network", "no-such-net"), "has no network 'no-such-net'"),
        (("--action", "copy"), "--pool P"),
    ]
    for extra, said in cases:
        bad = b.run("test-failover", "vmt", "--host", "host2", "--new-vm", new, *extra, check=False)
        assert bad.code == 2, bad.error
        assert said in bad.error, bad.error
    # Refused before a job existed: nothing ran, nothing was defined.
    assert len(jobs_of(drill, "test-failover")) == before
    assert domain_xml(new) is None
    # A failover cannot run from a copy: syncback would never see its writes.
    copy = b.run(
        "failover",
        "vmt",
        "--host",
        "host2",
        "--new-vm",
        new,
        "--pool",
        pools.active,
        "--action",
        "copy",
        "--confirm",
        "FAILOVER",
        check=False,
    )
    assert copy.code == 2 and "syncback" in copy.error


def test_a_new_vm_on_the_export_with_its_datastore(
    drill: Drill, guest: Guest, pools: Pools, replica: dict[str, Any]
) -> None:
    b = drill.b
    new = f"{guest.name}-nbd"
    vmguest.remove_domain(new)
    done = b("test-failover", "vmt", "--host", "host2", "--new-vm", new, "--pool", pools.active)
    job = done["job"]
    assert job["status"] == "succeeded", job["message"]
    assert job["result"]["vm"]["pool"] == pools.active
    assert job["result"]["vm"]["disks"] == "nbd"
    xml = domain_xml(new) or ""
    assert "protocol='nbd'" in xml
    assert list(pools.path.iterdir()) == []  # nothing copied: the disks are the export
    b("unmount", job["result"]["image"])
    assert domain_xml(new) is None


def test_copy_puts_the_disks_in_the_pool_and_boots_from_them(
    drill: Drill, guest: Guest, pools: Pools, replica: dict[str, Any]
) -> None:
    b = drill.b
    new = f"{guest.name}-cp"
    vmguest.remove_domain(new)
    done = b(
        "test-failover",
        "vmt",
        "--host",
        "host2",
        "--new-vm",
        new,
        "--pool",
        pools.active,
        "--action",
        "copy",
    )
    job = done["job"]
    assert job["status"] == "succeeded", job["message"]
    assert job["result"]["vm"]["disks"] == "copy"
    assert job["result"]["presentation"] == "copy"
    volume = f"{new}-vda.qcow2"
    assert (pools.path / volume).exists()
    vols = vmguest.virsh("vol-list", pools.active).stdout
    assert volume in vols
    xml = domain_xml(new) or ""
    assert "protocol='nbd'" not in xml
    assert f"pool='{pools.active}'" in xml and f"volume='{volume}'" in xml
    # The copy boots on its own disk and reads what production wrote.
    console = vmguest.start_with_console(new)
    try:
        assert console.expect("TANDEM-BOOT").endswith("existing")
        assert console.expect("TANDEM-SUM").split()[1] == guest.sum
        console.send("off")
    finally:
        console.close()
    # Withdrawing the copy removes the VM and the volumes made for it.
    b("unmount", job["result"]["image"])
    assert domain_xml(new) is None
    assert not (pools.path / volume).exists()
