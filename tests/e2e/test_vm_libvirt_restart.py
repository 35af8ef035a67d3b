"""libvirtd restarted during a VM backup (issue #16, bad input), against a libvirtd of the
test's own (``vmguest.second_libvirt``), so the shared ``qemu:///system`` is left alone.

The capture is held mid-backup without a sleep: the private libvirtd is paused (SIGSTOP)
before the capture, so the agent waits in its first libvirt call (seen as a connection in
the daemon's listen queue); then the appliance is paused and libvirtd continued, so the
agent begins the pull-mode backup and waits in its first upload to the appliance (seen in
the kernel's socket table). With the backup running, libvirtd is killed and started again.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import vmguest
from tests.e2e.conftest import (
    Cli,
    Daemon,
    api,
    calling,
    job_row,
    pause,
    register_host,
    resume,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DISK_MIB = 48


@pytest.fixture(scope="module")
def hv(libvirt_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("hvr")
    with vmguest.second_libvirt(folder):
        yield folder


def uri_of(folder: Path) -> str:
    return f"qemu+unix:///system?socket={folder / 'sock' / 'libvirt-sock'}"


def waiting_in_listen_queue(folder: Path) -> bool:
    """Whether a client connected to the (paused) libvirtd and was not accepted yet."""
    sock = folder / "sock" / "libvirt-sock"
    out = subprocess.run(
        ["ss", "-xlH", "src", str(sock)], capture_output=True, text=True, check=True
    ).stdout
    return any(int(line.split()[2]) > 0 for line in out.splitlines() if line.split())


def checkpoints(name: str, uri: str) -> list[str]:
    listed = vmguest.virsh("checkpoint-list", "--name", name, uri=uri).stdout
    return [line.strip() for line in listed.splitlines() if line.strip()]


def backup_running(name: str, uri: str) -> bool:
    return vmguest.virsh("backup-dumpxml", name, check=False, uri=uri).returncode == 0


def test_libvirtd_restarted_during_a_backup_fails_cleanly_and_the_next_capture_repairs(
    hv: Path, tmp_path: Path
) -> None:
    uri = uri_of(hv)
    name = f"tandem-lvr-{tmp_path.name}"[:60]
    boot = vmguest.guest_boot(tmp_path)
    disk = vmguest.make_disk(tmp_path / "vda.qcow2", DISK_MIB)
    xml = tmp_path / "domain.xml"
    xml.write_text(vmguest.domain_xml(name, boot, [disk], "lvr1"))
    vmguest.virsh("define", str(xml), uri=uri)
    appliance = Daemon.create("appliance", tmp_path / "prod", "prod")
    agent = Daemon.create("agent", tmp_path / "agent", "host1")
    agent.extra_env = {"TANDEM_LIBVIRT_URI": uri}
    console = vmguest.start_with_console(name, uri)
    libvirtd_paused = False
    try:
        appliance.start()
        agent.start()
        a: Cli = appliance.cli()
        register_host(a, agent)
        console.expect("TANDEM-SUM")
        a("app", "add", "lvr", "--host", "host1", "--kind", "vm", "--domain", name)
        a("template", "add", "kept", "--keep", "4")
        a("app", "protect", "lvr", "--template", "kept")
        console.send("rewrite alpha")
        console.expect("TANDEM-SUM")
        first = a("capture", "lvr")
        image_a = first["image"]["id"]
        assert first["job"]["status"] == "succeeded", first["job"]["message"]
        console.send("rewrite beta")
        sum_b = console.expect("TANDEM-SUM").split()[1]

        # Hold the capture mid-backup (module docstring).
        libvirtd = vmguest.second_libvirtd_pid(hv)
        os.kill(libvirtd, signal.SIGSTOP)
        libvirtd_paused = True
        held = a("capture", "lvr", "--no-wait")["job"]["id"]
        wait_for(lambda: waiting_in_listen_queue(hv), 120, "the agent's call to libvirtd")
        pause(appliance)
        os.kill(libvirtd, signal.SIGCONT)
        libvirtd_paused = False
        wait_for(lambda: backup_running(name, uri), 120, "the pull-mode backup")
        wait_for(lambda: calling(agent, appliance), 120, "the agent's upload to the appliance")

        vmguest.restart_second_libvirt(hv)
        assert "running" in vmguest.virsh("domstate", name, uri=uri).stdout
        resume(appliance)

        def ended() -> dict[str, Any] | None:
            j = job_row(appliance, held)
            return j if j["status"] in ("succeeded", "failed") else None

        job = wait_for(ended, 300, "the held capture to end")
        assert job["status"] == "failed", job
        assert "libvirt failed during the capture" in job["message"], job["message"]
        assert "nothing became an image" in job["message"]
        assert [i["id"] for i in a("images", "lvr")] == [image_a]
        a("image", "verify", image_a)

        # The next capture ends the backup left running and is incremental again from the
        # previous image's checkpoint (the chain is repaired), saying so.
        again = a("capture", "lvr")["job"]
        assert again["status"] == "succeeded", again["message"]
        assert "incremental since checkpoint" in again["message"], again["message"]
        log = " | ".join(line["text"] for line in a("job", "log", again["id"]))
        assert "ended the backup job an interrupted capture left" in log, log
        assert not backup_running(name, uri)
        # The failed capture's checkpoint is dropped; the base's and the new one are kept.
        base_cp = again["message"].split("incremental since checkpoint ")[1].split(":")[0]
        assert sorted(checkpoints(name, uri)) == sorted([base_cp, f"tandem-{again['id']}"])
        # The agent's cached connection (its host info) answers again after the restart.
        with api(agent) as client:
            info = client.get("/api/v1/info").json()
            assert info["hypervisor"] is True, info
        image_c = again["result"]["image"]
        a("image", "verify", image_c)

        # The repaired chain holds what the guest wrote: restore it after another rewrite
        # and the guest boots with the sum it had at the capture.
        console.send("rewrite gamma")
        assert console.expect("TANDEM-SUM").split()[1] != sum_b
        restore = ("--confirm", "DATA LOSS", "--confirm", "OVERWRITE OTHER APPS")
        done = a("restore", "lvr", "--image", image_c, *restore, "--shutdown-timeout", "3")
        assert done["job"]["status"] == "succeeded", done["job"]["message"]
        console.close()
        console.fd = -1
        console = vmguest.start_with_console(name, uri)
        assert console.expect("TANDEM-BOOT").endswith("existing")
        assert console.expect("TANDEM-SUM").split()[1] == sum_b
    finally:
        if libvirtd_paused:
            os.kill(vmguest.second_libvirtd_pid(hv), signal.SIGCONT)
        resume(appliance)
        if console.fd >= 0:
            console.close()
        agent.stop()
        appliance.stop()
        vmguest.remove_domain(name, uri)
