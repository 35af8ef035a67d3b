"""New VMs at DR with a datastore (``--pool``), a copy of their disks (``--action copy``)
and the bad input around them, with a real guest under libvirt (QEMU, TCG) and two real
sites driven by the CLI.

The production guest (``tests/vmguest.py``) formats its disk and prints its md5; a new VM
at DR that prints the same md5 at boot read exactly what production wrote.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import vmguest
from tests.e2e.conftest import Daemon, Drill, register_host, running_drill, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

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
    # qcow2 v3, as a new empty VM's volumes: v2 cannot keep the dirty bitmaps the copy's
    # own later captures need.
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(pools.path / volume)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["format-specific"]["data"]["compat"] == "1.1"
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


def test_console_forms_take_the_new_vm_and_the_app_manager_shows_power(
    drill: Drill, guest: Guest, pools: Pools, replica: dict[str, Any]
) -> None:
    """The Test Failover form of a vm app has the new-VM fields, validated as the API's
    are; the App Manager shows the power state of the VM's domains at each site."""
    import re

    import httpx

    from tests.appliance.conftest import pinned

    new = f"{guest.name}-ui"
    vmguest.remove_domain(new)
    with httpx.Client(base_url=drill.dr.url, verify=pinned(drill.dr.directory)) as c:
        c.post("/sign-in", data={"token": drill.dr.token, "next": "/apps"})
        page = c.get("/apps/vmt", params={"image": replica["id"]})
        form = page.text[page.text.index('id="op-test-failover"') :].split("</details>")[0]
        for field in ('name="new_vm"', 'name="pool"', 'name="network"', 'name="power_on"'):
            assert field in form
        # Or an existing VM of the host; or the disks' file systems at a mount point.
        for field in ('name="vm"', 'name="shutdown_timeout"', 'name="mount_point"'):
            assert field in form
        fo = page.text[page.text.index('id="op-failover"') :].split("</details>")[0]
        assert 'name="hosts"' in fo and 'name="all_hosts"' in fo
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
        assert csrf is not None
        base = {"csrf": csrf.group(1), "image": replica["id"], "host": "host2"}
        refused = [
            ({"new_vm": "no spaces allowed"}, "new_vm: "),  # the API's own message
            ({"new_vm": new, "pool": "no-such-pool"}, "has no storage pool"),
            ({"new_vm": new, "pool": pools.inactive}, "inactive"),
        ]
        for fields, said in refused:
            answer = c.post("/apps/vmt/actions/test-failover", data={**base, **fields})
            assert answer.status_code == 422, answer.text[-400:]
            assert said in answer.text and 'role="alert"' in answer.text
        assert domain_xml(new) is None
        answer = c.post(
            "/apps/vmt/actions/test-failover",
            data={**base, "new_vm": new, "pool": pools.active, "power_on": "on"},
            follow_redirects=False,
        )
        assert answer.status_code == 303, answer.text[-400:]
        job_id = answer.headers["location"].split("/jobs/")[1].split("?")[0]
        job = wait_for(
            lambda: (
                (j := drill.b("job", "show", job_id))["status"] in ("succeeded", "failed") and j
            ),
            300,
            "the test failover",
        )
        assert job["status"] == "succeeded", job["message"]
        assert job["result"]["vm"]["running"] is True
        try:
            manager = c.get("/apps").text
            row = manager[manager.index('data-app="vmt"') :].split("</tr>")[0]
            assert f"{new} on host2" in row and "running" in row
        finally:
            drill.b("unmount", job["result"]["image"])
    assert domain_xml(new) is None
    # At production the App Manager shows the protected domain itself.
    with httpx.Client(base_url=drill.prod.url, verify=pinned(drill.prod.directory)) as c:
        c.post("/sign-in", data={"token": drill.prod.token, "next": "/apps"})
        manager = c.get("/apps").text
        row = manager[manager.index('data-app="vmt"') :].split("</tr>")[0]
        assert f"{guest.name} on host1" in row and "running" in row


@pytest.fixture(scope="module")
def second_hv(libvirt_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with vmguest.second_libvirt(tmp_path_factory.mktemp("hv2")) as uri:
        yield uri


@pytest.fixture(scope="module")
def more_hosts(drill: Drill, second_hv: str) -> Iterator[None]:
    """Two more DR hosts: ``host3``, an agent on a second hypervisor of this machine (a
    libvirtd of its own, ``vmguest.second_libvirt``: it can hold the same domain name and
    UUID as the system one), and ``host4``, an agent whose libvirt does not answer."""
    agents = []
    for name, uri in (("host3", second_hv), ("host4", "qemu+unix:///system?socket=/nonexistent")):
        agent = Daemon.create("agent", drill.root / name, name)
        agent.extra_env = {"TANDEM_LIBVIRT_URI": uri}
        agents.append(agent)
    try:
        for agent in agents:
            agent.start()
            register_host(drill.b, agent)
        yield
    finally:
        for agent in agents:
            agent.stop()


def uuid_in(xml: str) -> str:
    return xml.split("<uuid>")[1].split("</uuid>")[0]


def test_failover_defines_the_vm_on_every_host_named(
    drill: Drill, guest: Guest, replica: dict[str, Any], more_hosts: None, second_hv: str
) -> None:
    """Last in this module: production is lost (its domain goes), the app fails over."""
    b = drill.b
    new = f"{guest.name}-ha"
    failover = ("failover", "vmt", "--host", "host2", "--new-vm", new, "--confirm", "FAILOVER")
    # A host that is not a hypervisor is refused before anything happens.
    bad = b.run(*failover, "--hosts", "host3,host4", check=False)
    assert bad.code != 0 and "not a hypervisor" in bad.error and "host4" in bad.error
    assert not jobs_of(drill, "failover")
    both = b.run(*failover, "--hosts", "host3", "--all-hosts", check=False)
    assert both.code == 2 and "not both" in both.error

    source_uuid = uuid_in(domain_xml(guest.name) or "")
    vmguest.remove_domain(guest.name)  # production is gone; the identity moves to DR
    try:
        done = b(*failover, "--all-hosts", "--power-on")
        job = done["job"]
        assert job["status"] == "succeeded", job["message"]
        assert job["result"]["vm_hosts"] == ["host2", "host3"]  # host4 is no hypervisor
        on2 = vmguest.virsh("dominfo", new).stdout
        assert "running" in on2
        xml3 = vmguest.virsh("dumpxml", new, uri=second_hv).stdout
        assert uuid_in(xml3) == source_uuid == uuid_in(domain_xml(new) or "")
        assert "shut off" in vmguest.virsh("dominfo", new, uri=second_hv).stdout
        assert "protocol='nbd'" in xml3

        # The other host runs it from the same export when the first is gone.
        vmguest.virsh("destroy", new)
        console = vmguest.start_with_console(new, second_hv)
        try:
            assert console.expect("TANDEM-BOOT").endswith("existing")
            assert console.expect("TANDEM-SUM").split()[1] == guest.sum
        finally:
            console.close()
    finally:
        vmguest.remove_domain(new)
        vmguest.remove_domain(new, second_hv)
