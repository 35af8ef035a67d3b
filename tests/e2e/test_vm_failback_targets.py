"""Replica-style failback of a VM onto a domain restored elsewhere at production
(``--target restored``) and onto a new domain defined there (``--target new``), with a real
guest under libvirt (QEMU, TCG), two real sites and the CLI.

The guest (``tests/vmguest.py``) prints ``TANDEM-SUM <md5 of its disk>`` when it boots and
when told ``sum``; ``rewrite WORD`` rewrites 1 MiB of its disk. "The production-side domain
holds what the DR guest wrote" is that domain printing the DR guest's last sum.

Both sites' hosts share one libvirtd here, where a domain UUID is unique: production's
domain is undefined (an outage: its disk stays) before the VM fails over to a new VM at DR
that keeps its identity.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import vmguest
from tests.e2e.conftest import Drill, running_drill, wait_for
from tests.e2e.test_vm_lifecycle import (
    app_state,
    ask_sum,
    close_console,
    identity,
    replica_at_dr,
    rewrite,
    state_of,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

DISK_MIB = 48
MIB = 1024 * 1024
APP = "fbt"


@dataclass
class Guest:
    name: str
    folder: Path
    disk: Path
    boot: vmguest.Boot
    console: vmguest.Console
    sum: str


@dataclass
class Pools:
    active: str
    inactive: str
    path: Path


@pytest.fixture(scope="module")
def guest(libvirt_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    folder = tmp_path_factory.mktemp("fbguest")
    name = f"tandem-fbt-{folder.name}"
    boot = vmguest.guest_boot(folder)
    disk = vmguest.make_disk(folder / "vda.qcow2", DISK_MIB)
    xml = folder / "domain.xml"
    xml.write_text(vmguest.domain_xml(name, boot, [disk], "fbt1"))
    vmguest.remove_domain(name)
    vmguest.virsh("define", str(xml))
    console = vmguest.start_with_console(name)
    found = Guest(name, folder, disk, boot, console, "")
    made = [name, *(f"{name}-{suffix}" for suffix in ("restored", "dr", "dr2", "new", "diskless"))]
    try:
        found.sum = console.expect("TANDEM-SUM").split()[1]
        yield found
    finally:
        close_console(found.console)
        for domain in made:
            vmguest.remove_domain(domain)


@pytest.fixture(scope="module")
def pools(libvirt_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    """Production's datastore for a new VM (a directory pool that runs) and an idle one."""
    folder = tmp_path_factory.mktemp("fbpools")
    tag = uuid.uuid4().hex[:8]
    active, inactive = f"tandem-fbpool-{tag}", f"tandem-fbidle-{tag}"
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
    with running_drill(tmp_path_factory.mktemp("vmfbt")) as built:
        yield built


def exists(domain: str) -> bool:
    return vmguest.virsh("dominfo", domain, check=False).returncode == 0


def shown(drill: Drill) -> tuple[str, str]:
    """Production's catalog identity of the app: its host and domain."""
    doc = drill.a("app", "show", APP)
    return str(doc["host"]), str(doc["path"])


def fail_over_and_write(drill: Drill, guest: Guest, production: str, dr_name: str) -> str:
    """Production's domain is lost (its disk stays); the VM fails over to a new VM at DR,
    which boots what production held and writes: the DR guest's sum."""
    snap = drill.a("capture", APP)["image"]["id"]
    wait_for(lambda: replica_at_dr(drill, APP, snap), 120, "the replica")
    close_console(guest.console)
    vmguest.remove_domain(production)
    vmguest.remove_domain(dr_name)
    done = drill.b("failover", APP, "--host", "host2", "--new-vm", dr_name, "--confirm", "FAILOVER")
    assert done["job"]["status"] == "succeeded", done["job"]["message"]
    dr = vmguest.start_with_console(dr_name)
    try:
        assert dr.expect("TANDEM-SUM").split()[1] == guest.sum
        return rewrite(dr, f"dr-{dr_name[-3:]}")
    finally:
        dr.close()


def written_at_production(drill: Drill) -> int:
    """Bytes production's newest restore (a failback's first pass) wrote into the disks."""
    restores = [j for j in drill.a("jobs", "--app", APP) if j["type"] == "restore"]
    newest = sorted(restores, key=lambda j: str(j["created"]))[-2:]  # the failback's passes
    first_pass = newest[0]
    return int(drill.a("job", "show", first_pass["id"])["result"]["stats"]["bytes_written"])


def sum_of_running(domain: str) -> str:
    console = vmguest.Console(domain)
    try:
        answered: str = wait_for(lambda: ask_sum(console), 240, f"the sum of {domain}")
        return answered
    finally:
        console.close()


def test_failback_onto_a_vm_restored_elsewhere_switches_the_identity_then_commit(
    drill: Drill, guest: Guest, pools: Pools
) -> None:
    a, b = drill.a, drill.b
    a("app", "add", APP, "--host", "host1", "--kind", "vm", "--domain", guest.name)
    a("app", "protect", APP, "--template", "mirrored")
    guest.sum = rewrite(guest.console, "alpha")
    restored = f"{guest.name}-restored"
    dr_name = f"{guest.name}-dr"
    dr_sum = fail_over_and_write(drill, guest, guest.name, dr_name)

    # Production restored the VM elsewhere from a backup: another domain on a copy of its
    # disk (a UUID and MACs of its own), registered by production's operators.
    disk = Path(shutil.copy(guest.disk, guest.folder / "restored.qcow2"))
    xml = guest.folder / "restored.xml"
    xml.write_text(vmguest.domain_xml(restored, guest.boot, [disk], "fbt1"))
    vmguest.virsh("define", str(xml))
    before = identity(restored)
    a("app", "add", f"{APP}-restored", "--host", "host1", "--kind", "vm", "--domain", restored)
    ghost = f"{guest.name}-ghost"
    a("app", "add", f"{APP}-ghost", "--host", "host1", "--kind", "vm", "--domain", ghost)
    diskless = f"{guest.name}-diskless"  # restored without the disk the image holds
    (guest.folder / "diskless.xml").write_text(vmguest.domain_xml(diskless, guest.boot, [], "x"))
    vmguest.virsh("define", str(guest.folder / "diskless.xml"))
    a("app", "add", f"{APP}-diskless", "--host", "host1", "--kind", "vm", "--domain", diskless)

    # Bad input is refused at submit: nothing is stopped, the DR VM runs on.
    new = ("--target", "new", "--host", "host1", "--domain")
    refusals = [
        (("--target", "restored", "--host", "host1", "--domain", "nowhere"), "No vm app"),
        (("--target", "restored", "--host", "host1", "--domain", ghost), "does not exist"),
        (("--target", "restored", "--host", "host1", "--domain", diskless), "no file disk vda"),
        (("--target", "restored", "--host", "host1", "--domain", "/srv/x"), "domain name"),
        (("--target", "restored", "--host", "host1"), "needs --host and --domain"),
        ((*new, restored, "--pool", pools.active), "already exists"),
        ((*new, guest.name, "--pool", pools.active), f"is {APP!r} itself"),
        ((*new, f"{guest.name}-new", "--pool", "no-such-pool"), "no storage pool"),
        ((*new, f"{guest.name}-new", "--pool", pools.inactive), "(it is inactive)"),
        ((*new, f"{guest.name}-new"), "--pool"),
    ]
    for args, says in refusals:
        refused = b.run("failback", APP, *args, check=False)
        assert refused.code != 0 and says in refused.error, (args, refused.error)
    assert state_of(dr_name) == "running"
    assert app_state(b, APP) == "failed-over"
    assert shown(drill) == ("host1", guest.name)
    assert not exists(f"{guest.name}-new")

    failback = ("failback", APP, "--target", "restored", "--host", "host1", "--domain", restored)
    job = b(*failback, "--power-on", "--shutdown-timeout", "2")["job"]
    assert job["status"] == "succeeded", job["message"]
    assert app_state(b, APP) == "failback-pending"
    assert state_of(dr_name) == "shut off"
    assert state_of(restored) == "running"
    # The identity switch: production's catalog now names the restored domain as the app;
    # the domain keeps its own UUID and MACs (see operations.replica_failback).
    assert shown(drill) == ("host1", restored)
    assert identity(restored) == before
    assert sum_of_running(restored) == dr_sum
    # Only the difference was written: the 1 MiB the DR guest rewrote.
    assert written_at_production(drill) <= MIB + 128 * 1024

    committed = b("commit-failback", APP)["job"]
    assert committed["status"] == "succeeded", committed["message"]
    assert app_state(b, APP) == "managed"
    assert not exists(dr_name)
    assert shown(drill) == ("host1", restored)
    # The placeholder production registered for the failback was merged into the app.
    assert f"{APP}-restored" not in {x["name"] for x in a("apps")}
    # Protection resumes from the restored domain (read whole: its disks were rewritten).
    again = a("capture", APP)["job"]
    assert again["status"] == "succeeded", again["message"]
    guest.sum = dr_sum
    guest.console = vmguest.Console(restored)


def test_failback_onto_a_new_vm_at_production_undo_removes_it_then_commit(
    drill: Drill, guest: Guest, pools: Pools
) -> None:
    a, b = drill.a, drill.b
    restored = f"{guest.name}-restored"
    assert shown(drill) == ("host1", restored)  # where the first test left the app
    dr_name = f"{guest.name}-dr2"
    dr_sum = fail_over_and_write(drill, guest, restored, dr_name)
    dr_uuid, dr_macs = identity(dr_name)

    new = f"{guest.name}-new"
    volume = pools.path / f"{new}-vda.qcow2"
    failback = ("failback", APP, "--target", "new", "--host", "host1", "--domain", new)
    job = b(*failback, "--pool", pools.active, "--power-on", "--shutdown-timeout", "2")["job"]
    assert job["status"] == "succeeded", job["message"]
    assert app_state(b, APP) == "failback-pending"
    assert state_of(dr_name) == "shut off"
    # A new domain registered at production, on a qcow2 volume of the pool, written whole.
    assert state_of(new) == "running"
    assert shown(drill) == ("host1", new)
    assert volume.is_file()
    new_uuid, new_macs = identity(new)
    assert new_uuid != dr_uuid  # a UUID of its own; the captured NICs and MACs
    assert new_macs == dr_macs
    assert sum_of_running(new) == dr_sum
    # Written whole: the guest's data onto the empty volume.
    assert written_at_production(drill) >= vmguest.PATTERN_MIB * MIB

    # Undone: the new domain and its volume go, the app is the one it was, the DR VM runs.
    undone = b("undo-failback", APP)["job"]
    assert undone["status"] == "succeeded", undone["message"]
    assert app_state(b, APP) == "failed-over"
    assert not exists(new)
    assert not volume.exists()
    assert shown(drill) == ("host1", restored)
    assert state_of(dr_name) == "running"
    assert sum_of_running(dr_name) == dr_sum

    # Again, to the end: commit keeps the new domain as the app.
    job = b(*failback, "--pool", pools.active, "--shutdown-timeout", "2")["job"]
    assert job["status"] == "succeeded", job["message"]
    assert state_of(new) == "shut off"  # without --power-on
    committed = b("commit-failback", APP)["job"]
    assert committed["status"] == "succeeded", committed["message"]
    assert app_state(b, APP) == "managed"
    assert not exists(dr_name)
    assert shown(drill) == ("host1", new)
    assert volume.is_file()
    close_console(guest.console)
    guest.console = vmguest.start_with_console(new)
    assert guest.console.expect("TANDEM-SUM").split()[1] == dr_sum
    # Protection resumes from the new domain: read whole once, then incremental (its
    # volumes keep the dirty bitmaps of its checkpoints).
    again = a("capture", APP)["job"]
    assert again["status"] == "succeeded", again["message"]
    assert "change tracking is lost after a restore" in again["message"]
    guest.sum = rewrite(guest.console, "new-vm")
    after = a("capture", APP)["job"]
    assert after["status"] == "succeeded", after["message"]
    assert "incremental since checkpoint" in after["message"]
