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
def libvirt_host() -> Iterator[None]:
    started = vmguest.libvirt_host()
    try:
        yield
    finally:
        vmguest.stop_started(started)


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
