"""A new VM at DR whose disks are the appliance's NBD export over TLS (``nbds://``): the DR
appliance listens for NBD on this machine's routable address (``--nbd-listen``, so TLS with
its own certificate), the hypervisor host is a libvirtd of its own whose ``qemu.conf``
names the agent's certificate folder, and the guest it boots reads what production wrote.
Real daemons, the CLI, real libvirt and QEMU (TCG).

That a plain NBD client gets nothing from such an export is ``test_dr_nbd_tls``'s."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tandem.agent.vm import TLS_DIR
from tests import vmguest
from tests.appliance.test_nbd_tls import routable_address
from tests.e2e.conftest import Daemon, Drill, free_port, register_host, running_drill, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass
class Guest:
    name: str
    sum: str


@pytest.fixture(scope="module")
def tls_drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    root = tmp_path_factory.mktemp("vm-tls")
    with running_drill(root, "--nbd-listen", f"{routable_address()}:{free_port()}") as built:
        yield built


@pytest.fixture(scope="module")
def guest(libvirt_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    folder = tmp_path_factory.mktemp("tls-guest")
    name = f"tandem-tls-{folder.name}"
    boot = vmguest.guest_boot(folder)
    disk = vmguest.make_disk(folder / "vda.qcow2", 48)
    xml = folder / "domain.xml"
    xml.write_text(vmguest.domain_xml(name, boot, [disk], "tls1"))
    vmguest.remove_domain(name)
    vmguest.virsh("define", str(xml))
    console = vmguest.start_with_console(name)
    try:
        written = console.expect("TANDEM-SUM").split()[1]
        yield Guest(name, written)
    finally:
        console.close()
        vmguest.remove_domain(name)


@pytest.fixture(scope="module")
def tls_host(
    tls_drill: Drill, libvirt_host: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """``host3``: an agent on a hypervisor of its own whose qemu.conf takes the NBD TLS
    credentials from the agent's folder (what the operator sets once per host)."""
    agent = Daemon.create("agent", tls_drill.root / "host3", "host3")
    trust = agent.directory / TLS_DIR
    trust.mkdir(mode=0o755)  # libvirtd refuses to start on a folder that does not exist
    conf = f'nbd_tls_x509_cert_dir = "{trust}"'
    with vmguest.second_libvirt(tmp_path_factory.mktemp("hv-tls"), conf) as uri:
        agent.extra_env = {"TANDEM_LIBVIRT_URI": uri}
        agent.start()
        try:
            register_host(tls_drill.b, agent)
            yield uri, trust
        finally:
            agent.stop()


@pytest.fixture(scope="module")
def replica(tls_drill: Drill, guest: Guest) -> str:
    """The guest protected at production; its first image replicated to DR."""
    d = tls_drill
    d.a("app", "add", "vmtls", "--host", "host1", "--kind", "vm", "--domain", guest.name)
    d.a("app", "protect", "vmtls", "--template", "mirrored")
    snap: str = d.a("capture", "vmtls")["image"]["id"]
    wait_for(lambda: any(i["id"] == snap for i in d.b("images", "vmtls")), 120, "the replica")
    return snap


def boots_with_production_data(domain: str, uri: str, guest: Guest) -> None:
    console = vmguest.start_with_console(domain, uri)
    try:
        assert console.expect("TANDEM-BOOT").endswith("existing")
        assert console.expect("TANDEM-SUM").split()[1] == guest.sum
        console.send("off")
    finally:
        console.close()


def test_a_new_vm_boots_from_the_export_over_tls(
    tls_drill: Drill, guest: Guest, replica: str, tls_host: tuple[str, Path]
) -> None:
    uri, trust = tls_host
    d = tls_drill
    new = f"{guest.name}-t"
    done: dict[str, Any] = d.b("test-failover", "vmtls", "--host", "host3", "--new-vm", new)
    job = done["job"]
    assert job["status"] == "succeeded", job["message"]
    assert done["nbd_uri"].startswith("nbds://") and done["nbd_fingerprint"] == d.dr.fingerprint
    try:
        # The host trusts exactly the appliance's certificate, sent with the request.
        pinned = (d.dr.directory / "cert.pem").read_text()
        assert (trust / "ca-cert.pem").read_text() == pinned
        assert (trust / f"appliance-{d.dr.fingerprint}.pem").stat().st_mode & 0o777 == 0o644
        xml = vmguest.virsh("dumpxml", new, uri=uri).stdout
        assert "protocol='nbd'" in xml and "tls='yes'" in xml
        assert routable_address() in xml
        log = [line["text"] for line in d.b("job", "log", job["id"])]
        told = f'nbd_tls_x509_cert_dir = "{trust}"'
        assert any(told in line for line in log), log  # the operator is told the line
        boots_with_production_data(new, uri, guest)
    finally:
        d.b("unmount", job["result"]["image"])
    assert vmguest.virsh("dominfo", new, uri=uri, check=False).returncode != 0


def test_a_copy_of_the_disks_is_read_over_tls(
    tls_drill: Drill,
    guest: Guest,
    replica: str,
    tls_host: tuple[str, Path],
    tmp_path: Path,
) -> None:
    uri, _ = tls_host
    pool = f"tandem-tls-{tmp_path.name}"[:60]
    tmp_path.chmod(0o755)
    vmguest.virsh("pool-define-as", pool, "dir", "--target", str(tmp_path), uri=uri)
    vmguest.virsh("pool-start", pool, uri=uri)
    new = f"{guest.name}-tc"
    try:
        done = tls_drill.b(
            "test-failover", "vmtls", "--host", "host3", "--new-vm", new, "--pool", pool,
            "--action", "copy",
        )  # fmt: skip
        job = done["job"]
        assert job["status"] == "succeeded", job["message"]
        assert job["result"]["vm"]["disks"] == "copy"
        assert (tmp_path / f"{new}-vda.qcow2").exists()
        boots_with_production_data(new, uri, guest)
        tls_drill.b("unmount", job["result"]["image"])
    finally:
        vmguest.remove_domain(new, uri)
        vmguest.virsh("pool-destroy", pool, check=False, uri=uri)
        vmguest.virsh("pool-undefine", pool, check=False, uri=uri)


def test_a_host_not_configured_for_nbd_tls_is_told_the_line(
    tls_drill: Drill, guest: Guest, replica: str
) -> None:
    """host2's libvirt (the system one) has no nbd_tls_x509_cert_dir: the VM cannot start
    over TLS, the job fails naming the qemu.conf line, and nothing stays defined."""
    new = f"{guest.name}-u"
    bad = tls_drill.b.run(
        "test-failover", "vmtls", "--host", "host2", "--new-vm", new, "--power-on", check=False
    )
    try:
        assert bad.code != 0
        assert "nbd_tls_x509_cert_dir" in bad.error, bad.error
        assert str(tls_drill.dr_agent.directory / TLS_DIR) in bad.error
        assert vmguest.virsh("dominfo", new, check=False).returncode != 0
    finally:
        vmguest.remove_domain(new)
