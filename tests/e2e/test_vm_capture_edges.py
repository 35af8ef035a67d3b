"""VM captures at their edges, with a real guest under libvirt (QEMU, TCG): a raw disk
(no checkpoint, so a full compare) and a guest agent that hangs in the freeze.

The guest's disk is raw and its domain has a guest-agent channel that the guest opens and
never answers (a guest built without qemu-ga; ``tests/vmguest.py``): libvirt then sees a
connected agent that does not respond, the case of an agent hung in a freeze.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import vmguest
from tests.e2e.conftest import Site

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DISK_MIB = 48
MIB = 1024 * 1024


@dataclass
class Guest:
    name: str
    console: vmguest.Console
    sum: str


@pytest.fixture(scope="module")
def guest(libvirt_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    folder = tmp_path_factory.mktemp("rawguest")
    name = f"tandem-raw-{folder.name}"
    boot = vmguest.guest_boot(folder)
    disk = vmguest.make_disk(folder / "vda.raw", DISK_MIB)
    xml = folder / "domain.xml"
    xml.write_text(vmguest.domain_xml(name, boot, [disk], "raw1", agent_channel=True))
    vmguest.remove_domain(name)
    vmguest.virsh("define", str(xml))
    console = vmguest.start_with_console(name)
    try:
        first = console.expect("TANDEM-SUM").split()[1]
        assert "TANDEM-AGENT silent" in console.lines  # the channel is open, unanswered
        yield Guest(name, console, first)
    finally:
        console.close()
        vmguest.remove_domain(name)


def nbd_md5(uri: str, tmp: Path) -> str:
    out = tmp / "export.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)],
        capture_output=True,
        check=True,
        timeout=120,
    )
    return vmguest.md5_of(out)


def test_a_guest_agent_that_hangs_in_the_freeze_gives_a_crash_consistent_image(
    site: Site, guest: Guest
) -> None:
    a = site.appliance.cli()
    a("app", "add", "rawvm", "--host", "host1", "--kind", "vm", "--domain", guest.name)
    a("template", "add", "manual", "--keep", "4")  # no schedule: captures run when asked
    a("app", "protect", "rawvm", "--template", "manual")
    done = a("capture", "rawvm")
    job = done["job"]
    assert job["status"] == "succeeded", job["message"]
    # The freeze was asked, not answered in time, the guest told to thaw; the capture went on.
    assert done["image"]["consistency"] == "crash-consistent"
    reason = job["result"]["consistency_reason"]
    assert "did not freeze the guest within" in reason and "told to thaw" in reason
    # The domain still runs and the guest still answers: nothing stayed frozen.
    assert "running" in vmguest.virsh("domstate", guest.name).stdout
    guest.console.send("sum")
    assert guest.console.expect("TANDEM-SUM").split()[1] == guest.sum


def test_a_raw_disk_is_captured_by_a_full_compare_and_says_why(
    site: Site, guest: Guest, tmp_path: Path
) -> None:
    a = site.appliance.cli()
    first = a("images", "rawvm")[0]
    guest.console.send("rewrite raw2")
    guest.sum = guest.console.expect("TANDEM-SUM").split()[1]

    done = a("capture", "rawvm")
    job = done["job"]
    assert job["status"] == "succeeded", job["message"]
    assert "full compare" in job["message"] and "not qcow2" in job["message"]
    assert "checkpoint" in job["message"]
    # Everything allocated was read (no bitmap), but what is new is the changed MiB only.
    assert job["result"]["bytes_read"] >= vmguest.PATTERN_MIB * MIB
    assert done["image"]["id"] != first["id"]
    assert vmguest.virsh("checkpoint-list", guest.name, "--name").stdout.strip() == ""

    mounted = a("mount", done["image"]["id"], "--host", "host1", "--action", "map-only")
    try:
        assert nbd_md5(mounted["nbd_uri"], tmp_path) == guest.sum
    finally:
        a("unmount", mounted["image"]["id"])
