"""A VM capture with the guest agent answering, with a real guest under libvirt (QEMU, TCG):
the guest's busybox initramfs holds the host's ``qemu-ga`` (``guest_boot(guest_agent=True)``),
which its ``/init`` starts on the domain's ``org.qemu.guest_agent.0`` channel.

The agent freezes the guest's file systems through it around the checkpoint, thaws them
after, and records the image as application-consistent. (The agent that hangs is
``test_vm_capture_edges.py``.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests import vmguest
from tests.e2e.conftest import Site

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DISK_MIB = 48
AGENT_DEADLINE = 240.0


@dataclass
class Guest:
    name: str
    console: vmguest.Console
    sum: str


def agent_command(domain: str, execute: str) -> object:
    """What the guest's qemu-ga returns for ``execute``, through libvirt."""
    out = vmguest.virsh(
        "qemu-agent-command", domain, json.dumps({"execute": execute}), "--timeout", "10"
    ).stdout
    return json.loads(out)["return"]


def wait_for_agent(domain: str) -> None:
    """Poll ``guest-ping`` until qemu-ga answers (it starts while the guest boots)."""
    deadline = time.monotonic() + AGENT_DEADLINE
    while True:
        answer = vmguest.virsh(
            "qemu-agent-command", domain, '{"execute":"guest-ping"}', "--timeout", "5", check=False
        )
        if answer.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"qemu-ga did not answer in the guest: {answer.stderr.strip()}")
        time.sleep(1)


@pytest.fixture(scope="module")
def guest(libvirt_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    folder = tmp_path_factory.mktemp("agentguest")
    name = f"tandem-qga-{folder.name}"
    boot = vmguest.guest_boot(folder, guest_agent=True)
    disk = vmguest.make_disk(folder / "vda.qcow2", DISK_MIB)
    xml = folder / "domain.xml"
    xml.write_text(vmguest.domain_xml(name, boot, [disk], "qga1", agent_channel=True))
    vmguest.remove_domain(name)
    vmguest.virsh("define", str(xml))
    console = vmguest.start_with_console(name)
    try:
        first = console.expect("TANDEM-SUM").split()[1]
        assert "TANDEM-AGENT qemu-ga" in console.lines  # the real agent serves the channel
        wait_for_agent(name)
        yield Guest(name, console, first)
    finally:
        console.close()
        vmguest.remove_domain(name)


def test_a_guest_agent_that_answers_freezes_the_guest_and_gives_an_app_consistent_image(
    site: Site, guest: Guest
) -> None:
    a = site.appliance.cli()
    a("app", "add", "qgavm", "--host", "host1", "--kind", "vm", "--domain", guest.name)
    a("template", "add", "manual", "--keep", "4")  # no schedule: captures run when asked
    a("app", "protect", "qgavm", "--template", "manual")
    done = a("capture", "qgavm")
    job = done["job"]
    assert job["status"] == "succeeded", job["message"]
    assert done["image"]["consistency"] == "app-consistent"
    assert job["result"]["consistency_reason"] == (
        "the guest agent froze the file systems for the checkpoint"
    )
    # Inside the guest, qemu-ga ran its fsfreeze hook to freeze, then to thaw.
    guest.console.expect("TANDEM-FSFREEZE freeze")
    guest.console.expect("TANDEM-FSFREEZE thaw")
    # Thawed after the checkpoint: the agent says so, and the guest still writes its disk.
    assert agent_command(guest.name, "guest-fsfreeze-status") == "thawed"
    assert "running" in vmguest.virsh("domstate", guest.name).stdout
    guest.console.send("rewrite qga2")
    assert guest.console.expect("TANDEM-SUM").split()[1] != guest.sum
