"""Virtual machines end to end: a real guest under libvirt (QEMU, TCG) at production, two
real sites, and the CLI.

The guest (``tests/vmguest.py``) formats its disk with a pattern at first boot and prints the
disk's md5 on its serial console; told to, it rewrites 1 MiB and prints the new sum. What it
wrote must be what the captured image holds, and a capture after the rewrite must read
about that 1 MiB, not the disk.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import vmguest
from tests.e2e.conftest import Drill, running_drill, wait_for

pytestmark = pytest.mark.slow

DISK_MIB = 64
MIB = 1024 * 1024


@dataclass
class Guest:
    name: str
    disk: Path
    console: vmguest.Console
    boot: vmguest.Boot
    sum: str


@pytest.fixture(scope="module")
def guest(libvirt_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    folder = tmp_path_factory.mktemp("guest")
    name = f"tandem-test-{folder.name}"
    boot = vmguest.guest_boot(folder)
    disk = vmguest.make_disk(folder / "vda.qcow2", DISK_MIB)
    xml = folder / "domain.xml"
    xml.write_text(vmguest.domain_xml(name, boot, [disk], "prod1"))
    vmguest.remove_domain(name)
    vmguest.virsh("define", str(xml))
    console = vmguest.start_with_console(name)
    try:
        first = console.expect("TANDEM-SUM").split()[1]
        assert "TANDEM-BOOT formatted prod1" in console.lines
        yield Guest(name, disk, console, boot, first)
    finally:
        console.close()
        vmguest.remove_domain(name)


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    with running_drill(tmp_path_factory.mktemp("vmdrill")) as built:
        yield built


def nbd_md5(uri: str, tmp: Path) -> str:
    """md5 of an NBD export, copied out by qemu-img (a real client)."""
    out = tmp / "export.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)],
        capture_output=True,
        check=True,
        timeout=120,
    )
    return vmguest.md5_of(out)


def replica_of(drill: Drill, app: str, snapshot: str) -> dict[str, Any] | None:
    """The DR replica of ``snapshot`` once it is there (the mirror record comes with it)."""
    listed = drill.b.run("images", app, check=False)
    if listed.code != 0:
        return None
    return next((i for i in listed.doc if i["id"] == snapshot), None)


def test_vms_lists_the_domains_of_a_hypervisor_host(drill: Drill, guest: Guest) -> None:
    domains = drill.a("vms", "--host", "host1")
    mine = next(d for d in domains if d["name"] == guest.name)
    assert mine["state"] == "running"
    assert [(d["target"], d["format"]) for d in mine["disks"]] == [("vda", "qcow2")]


def test_app_add_refuses_a_vm_without_a_domain(drill: Drill) -> None:
    bad = drill.a.run("app", "add", "novm", "--host", "host1", "--kind", "vm", check=False)
    assert bad.code != 0
    assert "--domain" in bad.error


def test_capture_reads_only_what_the_guest_changed(
    drill: Drill, guest: Guest, tmp_path: Path
) -> None:
    a = drill.a
    a("app", "add", "vm1", "--host", "host1", "--kind", "vm", "--domain", guest.name)
    a("app", "protect", "vm1", "--template", "mirrored")

    first = a("capture", "vm1")
    job = first["job"]
    assert job["status"] == "succeeded"
    assert "first capture" in job["message"]
    assert first["image"]["consistency"] == "crash-consistent"  # no guest agent here
    full_read = job["result"]["bytes_read"]
    assert full_read >= vmguest.PATTERN_MIB * MIB  # every allocated extent was read

    guest.console.send("rewrite home1")
    rewritten = guest.console.expect("TANDEM-SUM").split()[1]
    assert rewritten != guest.sum
    guest.sum = rewritten

    second = a("capture", "vm1")
    job = second["job"]
    assert job["status"] == "succeeded", job["message"]
    assert "incremental since checkpoint" in job["message"]
    # The dirty bitmap says 1 MiB changed: that, not the disk, is what is read.
    assert job["result"]["bytes_read"] <= 1 * MIB + 128 * 1024
    assert job["result"]["bytes_read"] < full_read // 10

    # What the guest last wrote is what the image holds, read over NBD by qemu-img.
    mounted = a("mount", second["image"]["id"], "--host", "host1", "--action", "map-only")
    uri = mounted["nbd_uri"]
    assert nbd_md5(uri, tmp_path) == rewritten
    a("unmount", mounted["image"]["id"])

    # The replica reached DR with the domain's XML in it.
    wait_for(lambda: replica_of(drill, "vm1", second["image"]["id"]), 120, "the replica")


def test_capture_of_a_vanished_domain_fails_cleanly(drill: Drill, guest: Guest) -> None:
    a = drill.a
    a("app", "add", "ghost", "--host", "host1", "--kind", "vm", "--domain", "no-such-domain")
    a("app", "protect", "ghost", "--template", "mirrored")
    bad = a.run("capture", "ghost", check=False)
    assert bad.code != 0
    assert "no-such-domain" in bad.error and "tandem vms" in bad.error
    assert a("images", "ghost") == []


def domain_info(name: str) -> str | None:
    found = vmguest.virsh("dumpxml", name, check=False)
    return found.stdout if found.returncode == 0 else None


def test_test_failover_to_a_new_vm_boots_what_production_wrote(
    drill: Drill, guest: Guest, tmp_path: Path
) -> None:
    b = drill.b
    replica = wait_for(lambda: (b.run("images", "vm1", check=False).doc or [None])[0], 60, "vm1")
    assert replica["kind"] == "replica"
    new = f"{guest.name}-dr"
    vmguest.remove_domain(new)

    # Refused before anything is made: the domain it came from, a name that exists.
    same = b.run("test-failover", "vm1", "--host", "host2", "--new-vm", guest.name, check=False)
    assert same.code != 0 and "never failed over onto the domain it came from" in same.error
    taken = f"{guest.name}-taken"
    (tmp_path / "taken.xml").write_text(vmguest.domain_xml(taken, guest.boot, [], "x"))
    vmguest.virsh("define", str(tmp_path / "taken.xml"))
    try:
        busy = b.run("test-failover", "vm1", "--host", "host2", "--new-vm", taken, check=False)
        assert busy.code != 0 and "already exists" in busy.error
        assert not [i for i in b("images", "vm1") if i["kind"] == "test-failover"]
    finally:
        vmguest.remove_domain(taken)
    no_vm = b.run("test-failover", "vm1", "--host", "host2", check=False)
    assert no_vm.code != 0 and "--new-vm" in no_vm.error

    done = b("test-failover", "vm1", "--host", "host2", "--new-vm", new)
    job = done["job"]
    assert job["status"] == "succeeded", job["message"]
    assert job["result"]["vm"]["name"] == new
    assert not job["result"]["vm"]["running"]  # no --power-on
    xml = domain_info(new)
    assert xml is not None
    source_xml = domain_info(guest.name) or ""
    uuid_of = lambda text: text.split("<uuid>")[1].split("</uuid>")[0]  # noqa: E731
    assert uuid_of(xml) != uuid_of(source_xml)  # a test VM is a new machine
    assert "<interface" not in xml  # and has no network unless one is named
    assert "protocol='nbd'" in xml and "<slice type='storage' offset='0'" in xml

    # The DR guest boots from the appliance's export and reads what production wrote.
    console = vmguest.start_with_console(new)
    try:
        assert console.expect("TANDEM-BOOT").endswith("existing")
        assert console.expect("TANDEM-SUM").split()[1] == guest.sum
        # Its writes land in the virtual copy, never in the replica.
        console.send("rewrite dr1")
        assert console.expect("TANDEM-SUM").split()[1] != guest.sum
    finally:
        console.close()

    # Ending the test removes the test VM with the copy.
    b("unmount", job["result"]["image"])
    assert domain_info(new) is None

    # Any image mounts as a new VM too, here powered on at once.
    mounted = b("mount", replica["id"], "--host", "host2", "--new-vm", new, "--power-on")
    assert mounted["job"]["result"]["vm"]["running"] is True
    b("unmount", mounted["image"]["id"])
    assert domain_info(new) is None


def test_failover_keeps_the_identity_so_not_beside_the_original(drill: Drill, guest: Guest) -> None:
    b = drill.b
    state = next(a for a in b("apps") if a["name"] == "vm1")["state"]
    new = f"{guest.name}-fo"
    refused = b.run(
        "failover",
        "vm1",
        "--host",
        "host2",
        "--new-vm",
        new,
        "--confirm",
        "FAILOVER",
        check=False,
    )
    assert refused.code != 0
    assert "UUID" in refused.error and "exists on this host" in refused.error
    # The failed job left everything as it was: no VM, no image, the same state.
    assert domain_info(new) is None
    assert not [i for i in b("images", "vm1") if i["kind"] == "failover"]
    assert next(a for a in b("apps") if a["name"] == "vm1")["state"] == state
