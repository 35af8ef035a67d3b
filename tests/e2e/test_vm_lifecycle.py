"""The VM lifecycle back home: restore at production, syncback of a failed-over VM, with a
real guest under libvirt (QEMU, TCG), two real sites and the CLI.

The guest (``tests/vmguest.py``) prints ``TANDEM-SUM <md5 of its disk>`` when it boots and
when told ``sum``; ``rewrite WORD`` rewrites 1 MiB of its disk. "The restored VM holds image
A" is the guest booting and printing A's sum.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import vmguest
from tests.e2e.conftest import Drill, running_drill, wait_for

pytestmark = pytest.mark.slow

DISK_MIB = 48
MIB = 1024 * 1024
RESTORE = ("--confirm", "DATA LOSS", "--confirm", "OVERWRITE OTHER APPS")


@dataclass
class Guest:
    name: str
    disk: Path
    xml: Path
    console: vmguest.Console
    boot: vmguest.Boot
    sum: str


@pytest.fixture(scope="module")
def guest(libvirt_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    folder = tmp_path_factory.mktemp("lifeguest")
    name = f"tandem-life-{folder.name}"
    boot = vmguest.guest_boot(folder)
    disk = vmguest.make_disk(folder / "vda.qcow2", DISK_MIB)
    xml = folder / "domain.xml"
    xml.write_text(vmguest.domain_xml(name, boot, [disk], "prod1"))
    vmguest.remove_domain(name)
    vmguest.virsh("define", str(xml))
    console = vmguest.start_with_console(name)
    found = Guest(name, disk, xml, console, boot, "")
    try:
        found.sum = console.expect("TANDEM-SUM").split()[1]
        yield found
    finally:
        close_console(found.console)
        vmguest.remove_domain(name)


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    with running_drill(tmp_path_factory.mktemp("vmlife")) as built:
        yield built


def close_console(console: vmguest.Console) -> None:
    """Close ``console`` once (its fd number may be another file's after that)."""
    if console.fd >= 0:
        with contextlib.suppress(OSError):
            console.close()
        console.fd = -1


def rewrite(console: vmguest.Console, word: str) -> str:
    console.send(f"rewrite {word}")
    return console.expect("TANDEM-SUM").split()[1]


def state_of(name: str) -> str:
    return vmguest.virsh("domstate", name).stdout.strip()


def identity(name: str) -> tuple[str, list[str]]:
    """The domain's UUID and MACs (as its definition holds them)."""
    xml = vmguest.virsh("dumpxml", "--inactive", name).stdout
    uuid = xml.split("<uuid>")[1].split("</uuid>")[0]
    return uuid, re.findall(r"<mac address='([0-9a-f:]+)'", xml)


def checkpoints(name: str) -> list[str]:
    listed = vmguest.virsh("checkpoint-list", "--name", name).stdout
    return [line.strip() for line in listed.splitlines() if line.strip()]


def boot_and_sum(guest: Guest) -> str:
    """Start the (powered-off) guest and return the sum it prints as it boots."""
    close_console(guest.console)
    guest.console = vmguest.start_with_console(guest.name)
    assert guest.console.expect("TANDEM-BOOT").endswith("existing")
    return guest.console.expect("TANDEM-SUM").split()[1]


def test_restore_powers_off_the_vm_restores_in_place_and_the_next_capture_reads_all(
    drill: Drill, guest: Guest
) -> None:
    a = drill.a
    a("app", "add", "life", "--host", "host1", "--kind", "vm", "--domain", guest.name)
    a("app", "protect", "life", "--template", "mirrored")
    sum_a = rewrite(guest.console, "alpha")
    image_a = a("capture", "life")["image"]["id"]
    sum_b = rewrite(guest.console, "beta")
    assert sum_b != sum_a
    before = identity(guest.name)
    assert checkpoints(guest.name)  # the capture's checkpoint

    # The VM runs: the restore powers it off itself (this guest ignores the ACPI button,
    # so it is powered off once the graceful shutdown timed out).
    assert state_of(guest.name) == "running"
    done = a("restore", "life", "--image", image_a, *RESTORE, "--shutdown-timeout", "3")
    job = done["job"]
    assert job["status"] == "succeeded", job["message"]
    assert "did not shut down within 3 s and was powered off" in job["message"]
    assert "change tracking is lost" in job["message"]
    assert job["result"]["vm"]["running"] is False
    assert job["result"]["vm"]["checkpoints_dropped"] >= 1
    assert state_of(guest.name) == "shut off"
    # In place: the same definition, UUID and MACs; the checkpoints are gone.
    assert identity(guest.name) == before
    assert not job["result"]["vm"]["redefined"]
    assert checkpoints(guest.name) == []
    # Only the rewritten 1 MiB differed.
    assert job["result"]["stats"]["bytes_written"] <= 1 * MIB + 128 * 1024

    assert boot_and_sum(guest) == sum_a

    # Change tracking is lost after a restore: the next capture reads everything, saying why.
    full = a("capture", "life")["job"]
    assert full["status"] == "succeeded", full["message"]
    assert "restored (from image " + image_a in full["message"]
    assert "change tracking is lost after a restore" in full["message"]
    assert full["result"]["bytes_read"] >= vmguest.PATTERN_MIB * MIB
    # ... and the one after it is incremental again.
    guest.sum = rewrite(guest.console, "gamma")
    again = a("capture", "life")["job"]
    assert "incremental since checkpoint" in again["message"]
    assert again["result"]["bytes_read"] <= 1 * MIB + 128 * 1024


def ask_sum(console: vmguest.Console) -> str | None:
    """The sum the guest prints when asked (None while it does not answer yet)."""
    console.send("sum")
    try:
        return console.expect("TANDEM-SUM", timeout=5).split()[1]
    except AssertionError:
        return None


def test_restore_with_power_on_starts_the_vm(drill: Drill, guest: Guest) -> None:
    a = drill.a
    latest = a("images", "life")[0]["id"]  # what the guest holds now (gamma)
    done = a(
        "restore", "life", "--image", latest, *RESTORE, "--shutdown-timeout", "1", "--power-on"
    )
    job = done["job"]
    assert job["status"] == "succeeded", job["message"]
    assert job["result"]["stats"]["bytes_written"] == 0  # nothing differed
    assert job["result"]["vm"]["running"] is True
    assert state_of(guest.name) == "running"
    close_console(guest.console)
    guest.console = vmguest.Console(guest.name)
    # It booted before the console was attached: ask for its sum until it answers.
    answered = wait_for(lambda: ask_sum(guest.console), 240, "the restored guest's sum")
    assert answered == guest.sum


def replica_at_dr(drill: Drill, app: str, image: str) -> bool:
    listed = drill.b.run("images", app, check=False)
    return listed.code == 0 and any(i["id"] == image for i in listed.doc)


def wait_shut_off(name: str) -> None:
    wait_for(lambda: state_of(name) == "shut off", 120, f"{name} to power off")


def test_writes_made_by_the_dr_guest_come_home_through_syncback_and_restore(
    drill: Drill, guest: Guest
) -> None:
    a, b = drill.a, drill.b
    snap = a("capture", "life")["image"]["id"]
    wait_for(lambda: replica_at_dr(drill, "life", snap), 120, "the replica")
    uuid, macs = identity(guest.name)

    # Production is lost: its domain goes (its disk stays, as after a site outage).
    close_console(guest.console)
    vmguest.remove_domain(guest.name)

    # Fail over to a new VM at DR: it keeps the identity and boots what production wrote.
    dr_name = f"{guest.name}-dr"
    vmguest.remove_domain(dr_name)
    done = b("failover", "life", "--host", "host2", "--new-vm", dr_name, "--confirm", "FAILOVER")
    assert done["job"]["status"] == "succeeded", done["job"]["message"]
    assert identity(dr_name) == (uuid, macs)
    dr = vmguest.start_with_console(dr_name)
    try:
        assert dr.expect("TANDEM-BOOT").endswith("existing")
        assert dr.expect("TANDEM-SUM").split()[1] == guest.sum

        # Catch-up syncback while the DR guest runs, then the final one once it is off.
        rewrite(dr, "dr-catchup")
        catchup = b("syncback", "life")["job"]
        assert catchup["status"] == "succeeded", catchup["message"]
        dr_sum = rewrite(dr, "dr-final")
        dr.send("off")
        wait_shut_off(dr_name)
    finally:
        dr.close()
    final = b("syncback", "life")["job"]
    assert final["status"] == "succeeded", final["message"]
    # Only what the DR guest wrote since the catch-up moved (1 MiB and the chunk framing).
    assert final["result"]["bytes_sent"] <= 2 * MIB
    image = final["result"]["image"]
    landed = {i["id"]: i for i in a("images", "life")}
    assert landed[image]["kind"] == "syncback"

    # Both sites' hosts share one libvirtd here, where a UUID is unique: the powered-off
    # DR VM is undefined by hand before production defines its domain again (at a real DR
    # site it stays until the failback removes it).
    vmguest.remove_domain(dr_name)

    # A domain that is gone with its disk: the restore fails cleanly, touching nothing.
    aside = guest.disk.with_suffix(".aside")
    guest.disk.rename(aside)
    try:
        gone = a.run("restore", "life", "--image", image, *RESTORE, check=False)
        assert gone.code != 0
        assert "is gone, and so is its disk" in gone.error
        assert vmguest.virsh("dominfo", guest.name, check=False).returncode != 0
    finally:
        aside.rename(guest.disk)
    assert {i["id"] for i in a("images", "life")} == set(landed)

    # Its disk is there: the restore defines the domain again from the image, with its
    # identity, and writes what the DR guest wrote.
    back = a("restore", "life", "--image", image, *RESTORE)["job"]
    assert back["status"] == "succeeded", back["message"]
    assert back["result"]["vm"]["redefined"] is True
    assert identity(guest.name) == (uuid, macs)
    guest.sum = dr_sum
    assert boot_and_sum(guest) == dr_sum

    # The snapshot-style failback ends it: the DR copy goes, protection resumes.
    ended = b("failback", "life")["job"]
    assert ended["status"] == "succeeded", ended["message"]
    assert next(x for x in a("apps") if x["name"] == "life")["state"] == "managed"


def app_state(cli: object, app: str) -> str:
    return str(next(x for x in cli("apps") if x["name"] == app)["state"])  # type: ignore[operator]


def test_replica_style_failback_to_the_original_vm_undo_then_commit(
    drill: Drill, guest: Guest
) -> None:
    a, b = drill.a, drill.b
    snap = a("capture", "life")["image"]["id"]
    wait_for(lambda: replica_at_dr(drill, "life", snap), 120, "the replica")

    # Production is lost, the VM fails over to a new VM at DR, which writes.
    close_console(guest.console)
    vmguest.remove_domain(guest.name)
    dr_name = f"{guest.name}-dr2"
    vmguest.remove_domain(dr_name)
    done = b("failover", "life", "--host", "host2", "--new-vm", dr_name, "--confirm", "FAILOVER")
    assert done["job"]["status"] == "succeeded", done["job"]["message"]
    dr = vmguest.start_with_console(dr_name)
    try:
        assert dr.expect("TANDEM-SUM").split()[1] == guest.sum
        dr_sum = rewrite(dr, "dr-replica-style")
    finally:
        dr.close()

    # Production is rebuilt with its disk (a new UUID: both sites' hosts share one libvirtd
    # here, where the DR VM holds the old one) and runs what it held before the outage.
    vmguest.virsh("define", str(guest.xml))
    guest.console = vmguest.start_with_console(guest.name)
    assert guest.console.expect("TANDEM-SUM").split()[1] == guest.sum
    rebuilt = identity(guest.name)

    # The failback powers the original off, sends the difference, powers the DR VM off,
    # takes the protective snapshot, sends again and powers the original on.
    new = b.run(
        "failback", "life", "--target", "new", "--host", "host1", "--path", "/x", check=False
    )
    assert new.code != 0 and "not a libvirt domain name" in new.error  # before anything moves
    failback = ("failback", "life", "--target", "original", "--power-on", "--shutdown-timeout")
    job = b(*failback, "2")["job"]
    assert job["status"] == "succeeded", job["message"]
    assert app_state(b, "life") == "failback-pending"
    assert state_of(dr_name) == "shut off"
    assert state_of(guest.name) == "running"

    # Undone: production's VM is powered off, the DR VM runs again from its copy as the
    # protective snapshot kept it.
    undone = b("undo-failback", "life")["job"]
    assert undone["status"] == "succeeded", undone["message"]
    assert app_state(b, "life") == "failed-over"
    assert state_of(guest.name) == "shut off"
    assert state_of(dr_name) == "running"
    dr = vmguest.Console(dr_name)
    try:
        assert wait_for(lambda: ask_sum(dr), 240, "the DR guest's sum") == dr_sum
    finally:
        dr.close()

    # Again, to the end.
    job = b(*failback, "2")["job"]
    assert job["status"] == "succeeded", job["message"]
    assert app_state(b, "life") == "failback-pending"
    assert state_of(dr_name) == "shut off"
    assert state_of(guest.name) == "running"
    assert identity(guest.name) == rebuilt  # restored in place: its own identity
    close_console(guest.console)
    guest.console = vmguest.Console(guest.name)
    answered = wait_for(lambda: ask_sum(guest.console), 240, "the failed-back guest's sum")
    assert answered == dr_sum
    guest.sum = dr_sum

    # Production works: commit. The DR VM and its copy go, protection resumes.
    committed = b("commit-failback", "life")["job"]
    assert committed["status"] == "succeeded", committed["message"]
    assert app_state(b, "life") == "managed"
    assert vmguest.virsh("dominfo", dr_name, check=False).returncode != 0
    again = a("capture", "life")["job"]
    assert again["status"] == "succeeded", again["message"]
    assert "change tracking is lost after a restore" in again["message"]
