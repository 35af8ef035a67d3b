"""An existing VM as the target of a test failover (``--vm DOMAIN``), and a multi-disk VM
image mounted as file systems (``_1``, ``_2`` mount points), with a real guest under
libvirt (QEMU, TCG) and two real sites driven by the CLI.

The production guest (``tests/vmguest.py``) formats its disk and prints its md5. The target
is another domain of the DR host with its own (raw) disk: taken over, it boots the
production data (it prints the production guest's md5); given back, it has its own
definition again and its disk file was never written.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import vmguest
from tests.appliance.conftest import pinned
from tests.appliance.test_nbd_tls import routable_address
from tests.e2e.conftest import Drill, free_port, running_drill, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DISK_MIB = 48
CONFIRM = ("--confirm", "REPLACE VM")


@dataclass
class Guest:
    name: str
    boot: vmguest.Boot
    sum: str
    folder: Path


@pytest.fixture(scope="module")
def guest(libvirt_host: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    folder = tmp_path_factory.mktemp("guest")
    name = f"tandem-ex-{folder.name}"
    boot = vmguest.guest_boot(folder)
    disk = vmguest.make_disk(folder / "vda.qcow2", DISK_MIB)
    xml = folder / "domain.xml"
    xml.write_text(vmguest.domain_xml(name, boot, [disk], "prod1"))
    vmguest.remove_domain(name)
    vmguest.virsh("define", str(xml))
    console = vmguest.start_with_console(name)
    try:
        first = console.expect("TANDEM-SUM").split()[1]
        yield Guest(name, boot, first, folder)
    finally:
        console.close()
        vmguest.remove_domain(name)


@dataclass
class Target:
    name: str
    disk: Path
    xml: str


def define_target(guest: Guest, tag: str, disks: int) -> Target:
    """A domain of the DR host with its own raw disk(s), defined (off)."""
    name = f"{guest.name}-{tag}"
    paths = [
        vmguest.make_disk(guest.folder / f"{tag}-{i}.raw", DISK_MIB // 2) for i in range(disks)
    ]
    vmguest.remove_domain(name)
    xml = guest.folder / f"{tag}.xml"
    xml.write_text(vmguest.domain_xml(name, guest.boot, paths, f"own-{tag}"))
    vmguest.virsh("define", str(xml))
    return Target(name, paths[0], domain_xml(name) or "")


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    with running_drill(tmp_path_factory.mktemp("vmexisting")) as built:
        yield built


@pytest.fixture(scope="module")
def replica(drill: Drill, guest: Guest) -> dict[str, Any]:
    """The guest protected at production and its first replica at DR."""
    a = drill.a
    a("app", "add", "vmx", "--host", "host1", "--kind", "vm", "--domain", guest.name)
    a("app", "protect", "vmx", "--template", "mirrored")
    snap = a("capture", "vmx")["image"]
    found: dict[str, Any] = wait_for(
        lambda: next((i for i in drill.b("images", "vmx") if i["id"] == snap["id"]), None),
        120,
        "the replica",
    )
    return found


def domain_xml(name: str) -> str | None:
    found = vmguest.virsh("dumpxml", "--inactive", name, check=False)
    return found.stdout if found.returncode == 0 else None


def disk_sources(xml: str) -> list[str]:
    return re.findall(r"<source (?:file|protocol)=['\"]([^'\"]+)['\"]", xml)


def macs(xml: str) -> list[str]:
    return re.findall(r"<mac address=['\"]([^'\"]+)['\"]", xml)


def uuid_in(xml: str) -> str:
    return xml.split("<uuid>")[1].split("</uuid>")[0]


def jobs_of(drill: Drill, kind: str, app: str = "vmx") -> list[dict[str, Any]]:
    return [j for j in drill.b("jobs", "--app", app) if j["type"] == kind]


def test_bad_targets_are_refused_before_anything_is_touched(
    drill: Drill, guest: Guest, replica: dict[str, Any]
) -> None:
    b = drill.b
    one = define_target(guest, "r1", 1)
    two = define_target(guest, "r2", 2)
    try:
        before = len(jobs_of(drill, "test-failover"))
        tf = ("test-failover", "vmx", "--host", "host2")
        cases = [
            # Powering off and re-pointing an operator's VM is destructive: typed confirmation.
            ((*tf, "--vm", one.name), 1, '"REPLACE VM"'),
            ((*tf, "--vm", guest.name, *CONFIRM), 2, "never failed over onto the domain"),
            ((*tf, "--vm", "no-such-domain", *CONFIRM), 1, "'no-such-domain' does not exist"),
            ((*tf, "--vm", two.name, *CONFIRM), 2, "has 2 disk(s) and the image of 'vmx' holds 1"),
            ((*tf, "--vm", one.name, "--new-vm", "x", *CONFIRM), 2, "not both"),
            ((*tf, "--vm", one.name, "--network", "default", *CONFIRM), 2, "keeps its own NICs"),
            ((*tf, "--vm", one.name, "--action", "copy", *CONFIRM), 2, "Drop --action copy"),
            ((*tf, "--new-vm", "x", "--shutdown-timeout", "5"), 2, "existing domain (--vm"),
        ]
        for args, code, said in cases:
            bad = b.run(*args, check=False)
            assert bad.code == code, (args, bad.error)
            assert said in bad.error, (args, bad.error)
        assert len(jobs_of(drill, "test-failover")) == before
        # A failover needs FAILOVER, then REPLACE VM, in that order.
        fo = ("failover", "vmx", "--host", "host2", "--vm", one.name)
        bad = b.run(*fo, "--confirm", "FAILOVER", check=False)
        assert bad.code == 1 and '"FAILOVER" and "REPLACE VM"' in bad.error, bad.error
        assert not jobs_of(drill, "failover")
        # The console's Test Failover form takes an existing VM, with the same checks.
        with httpx.Client(base_url=drill.dr.url, verify=pinned(drill.dr.directory)) as c:
            c.post("/sign-in", data={"token": drill.dr.token, "next": "/apps"})
            page = c.get("/apps/vmx", params={"image": replica["id"]})
            form = page.text[page.text.index('id="op-test-failover"') :].split("</form>")[0]
            assert 'name="vm"' in form and 'name="vm_confirm"' in form
            csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
            assert csrf is not None
            base = {"csrf": csrf.group(1), "image": replica["id"], "host": "host2"}
            for fields, said in [
                ({"vm": one.name}, "REPLACE VM"),
                ({"vm": two.name, "vm_confirm": "REPLACE VM"}, "has 2 disk(s)"),
            ]:
                answer = c.post("/apps/vmx/actions/test-failover", data={**base, **fields})
                assert answer.status_code == 422, answer.text[-400:]
                assert said in answer.text and 'role="alert"' in answer.text
        assert len(jobs_of(drill, "test-failover")) == before
        # Nothing was touched.
        assert domain_xml(one.name) == one.xml
        assert domain_xml(two.name) == two.xml
    finally:
        vmguest.remove_domain(one.name)
        vmguest.remove_domain(two.name)


def test_an_existing_vm_boots_the_production_data_and_gets_its_own_definition_back(
    drill: Drill, guest: Guest, replica: dict[str, Any]
) -> None:
    b = drill.b
    target = define_target(guest, "tgt", 1)
    try:
        # The target runs (its own guest formatted its own disk): it must be powered off.
        console = vmguest.start_with_console(target.name)
        try:
            own_sum = console.expect("TANDEM-SUM").split()[1]
        finally:
            console.close()
        assert own_sum != guest.sum
        done = b(
            "test-failover",
            "vmx",
            "--host",
            "host2",
            "--vm",
            target.name,
            "--shutdown-timeout",
            "1",
            *CONFIRM,
        )
        job = done["job"]
        assert job["status"] == "succeeded", job["message"]
        assert f"existing VM {target.name}" in job["message"]
        vm = job["result"]["vm"]
        assert vm["existing"] is True and vm["was_running"] is True and vm["running"] is False
        assert "powered off" in vm["power_off"]
        image = job["result"]["image"]
        xml = domain_xml(target.name) or ""
        # The operator's VM keeps its identity; its disk is now a slice of the export.
        assert uuid_in(xml) == uuid_in(target.xml) and macs(xml) == macs(target.xml)
        assert "protocol='nbd'" in xml and str(target.disk) not in xml
        # A second presentation cannot take the same domain.
        again = b.run(
            "mount", replica["id"], "--host", "host2", "--vm", target.name, *CONFIRM, check=False
        )
        assert again.code != 0 and f"already runs from image {image}" in again.error

        # Booted, it reads what production wrote (the guest leaves a known disk as it is).
        console = vmguest.start_with_console(target.name)
        try:
            assert console.expect("TANDEM-BOOT").endswith("existing")
            assert console.expect("TANDEM-SUM").split()[1] == guest.sum
        finally:
            console.close()

        # Withdrawn, the domain has its own definition back: its disk as before, untouched.
        b("unmount", image)
        back = domain_xml(target.name) or ""
        assert disk_sources(back) == disk_sources(target.xml) == [str(target.disk)]
        assert "tandem.dev/libvirt/target" not in back
        assert uuid_in(back) == uuid_in(target.xml)
        assert "shut off" in vmguest.virsh("domstate", target.name).stdout
        assert vmguest.md5_of(target.disk) == own_sum
        deleted = b("image", "delete", image)["job"]
        assert deleted["status"] == "succeeded", deleted["message"]
    finally:
        vmguest.remove_domain(target.name)


def test_a_failed_take_over_leaves_the_domain_as_it_was(
    drill: Drill, guest: Guest, replica: dict[str, Any]
) -> None:
    """The domain is asked to start on the export and cannot (a log file of its own in a
    folder that does not exist): the job fails, the domain has its own definition back and
    no image row is left."""
    b = drill.b
    target = define_target(guest, "bad", 1)
    broken = target.xml.replace(
        "</devices>",
        "<serial type='file'><source path='/nonexistent/tandem/serial.log'/>"
        "<target port='1'/></serial></devices>",
    )
    try:
        path = guest.folder / "bad-broken.xml"
        path.write_text(broken)
        vmguest.virsh("define", str(path))
        own = domain_xml(target.name) or ""
        images = {i["id"] for i in b("images", "vmx")}
        failed = b.run(
            "test-failover", "vmx", "--host", "host2", "--vm", target.name, "--power-on",
            *CONFIRM, check=False,
        )  # fmt: skip
        assert failed.code != 0
        assert "did not start on the export" in failed.error
        assert domain_xml(target.name) == own
        assert {i["id"] for i in b("images", "vmx")} == images
    finally:
        vmguest.remove_domain(target.name)


# --- a multi-disk VM mounted as file systems ---------------------------------------------


def make_ext4_disk(
    path: Path, mib: int, files: dict[str, str], *, partitioned: bool, header: bytes = b""
) -> Path:
    """A qcow2 disk holding an ext4 file system (in a first partition when ``partitioned``)
    with ``files``, made on the host. ``header`` goes in the first bytes of an unpartitioned
    one (ext4 leaves its first 1 KiB alone): ``TANDEM-DISK`` makes the test guest leave
    the disk as it is when it boots."""
    raw = path.with_suffix(".raw")
    subprocess.run(["truncate", "-s", f"{mib}M", str(raw)], check=True)
    offset = 0
    if partitioned:  # an MBR with one Linux partition from 1 MiB to the end
        offset = 1 << 20
        mbr = bytearray(512)
        sectors = ((mib << 20) - offset) // 512
        mbr[446:462] = struct.pack("<B3sB3sII", 0, bytes(3), 0x83, bytes(3), offset // 512, sectors)
        mbr[510:512] = b"\x55\xaa"
        with open(raw, "r+b") as out:
            out.write(mbr)
    fs = path.with_suffix(".fs")
    subprocess.run(["truncate", "-s", f"{mib - (offset >> 20)}M", str(fs)], check=True)
    root = path.with_suffix(".root")
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(fs)], check=True, timeout=120)
    with open(raw, "r+b") as out, open(fs, "rb") as src:
        out.seek(offset)
        while block := src.read(1 << 20):
            out.write(block)
        if header and not partitioned:
            out.seek(0)
            out.write(header)
    subprocess.run(
        ["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True, timeout=120
    )
    raw.unlink()
    fs.unlink()
    return path


@pytest.fixture(scope="module")
def two_disks(
    drill: Drill, guest: Guest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A 2-disk VM app and its snapshot: ext4 on its first disk, ext4 in the first
    partition of its second; the guest runs (a capture needs it) without writing either."""
    folder = tmp_path_factory.mktemp("twodisks")
    name = f"tandem-2d-{uuid.uuid4().hex[:8]}"
    first = make_ext4_disk(
        folder / "vda.qcow2",
        32,
        {"one.txt": "disk one\n"},
        partitioned=False,
        header=b"TANDEM-DISK two\n",
    )
    second = make_ext4_disk(folder / "vdb.qcow2", 32, {"two.txt": "disk two\n"}, partitioned=True)
    xml = folder / "domain.xml"
    xml.write_text(vmguest.domain_xml(name, guest.boot, [first, second], "two"))
    vmguest.virsh("define", str(xml))
    console = vmguest.start_with_console(name)
    try:
        assert console.expect("TANDEM-BOOT").endswith("existing")
        console.expect("TANDEM-SUM")
        drill.a("app", "add", "vm2", "--host", "host1", "--kind", "vm", "--domain", name)
        drill.a("app", "protect", "vm2", "--template", "mirrored")
        snap = drill.a("capture", "vm2")["image"]
        yield snap
    finally:
        console.close()
        vmguest.remove_domain(name)


def test_a_two_disk_vm_is_mounted_at_suffixed_mount_points(
    drill: Drill, two_disks: dict[str, Any], tmp_path: Path
) -> None:
    a = drill.a
    base = tmp_path / "vm2"
    done = a("mount", two_disks["id"], "--host", "host1", "--mount-point", str(base))
    job = done["job"]
    assert job["status"] == "succeeded", job["message"]
    first, second = Path(f"{base}_1"), Path(f"{base}_2")
    assert job["result"]["paths"] == [str(first), str(second)]
    assert not base.exists()
    assert (first / "one.txt").read_text() == "disk one\n"
    assert (second / "two.txt").read_text() == "disk two\n"  # in the disk's first partition
    # Writable, into the image's virtual copy: the snapshot itself never changes.
    written = f"written at the mount {uuid.uuid4().hex}\n"
    (first / "new.txt").write_text(written)
    os.sync()  # ext4 → loop → nbdfuse → the appliance: the copy holds it, read back apart
    assert read_from_export(job["result"]["nbd_uri"], tmp_path, "/new.txt") == written
    (second / "late.txt").write_text("written back at the unmount\n")  # not synced
    image = job["result"]["image"]
    a("unmount", image)
    # The unmount wrote the file systems back through the export before it went: nbdfuse
    # (its log beside the agent's FUSE folder) saw no request fail.
    said = (drill.prod_agent.directory / "disks" / f"{image}.log").read_text()
    assert not said.strip(), said
    assert not first.exists() and not second.exists()
    assert not [line for line in Path("/proc/mounts").read_text().splitlines() if str(base) in line]
    again = a("mount", two_disks["id"], "--host", "host1", "--mount-point", str(base))["job"]
    try:
        assert again["status"] == "succeeded", again["message"]
        assert not (first / "new.txt").exists()
    finally:
        a("unmount", again["result"]["image"])


def read_from_export(uri: str, folder: Path, name: str) -> str:
    """File ``name`` of the first disk's ext4 (at offset 0 of a VM image's export, as its
    header shows), read from a copy of the export made over a connection of its own:
    what the appliance's virtual copy holds, not what a host's cache says."""
    raw = folder / "export.raw"
    subprocess.run(["nbdcopy", uri, str(raw)], check=True, timeout=120)
    with open(raw, "rb") as fh:
        assert fh.read(len(b"TANDEM-DISK")) == b"TANDEM-DISK"
    done = subprocess.run(
        ["debugfs", "-R", f"cat {name}", str(raw)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    raw.unlink()
    return done.stdout


@pytest.fixture(scope="module")
def tls_drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    """A drill whose DR appliance serves NBD on this machine's routable address: over TLS."""
    root = tmp_path_factory.mktemp("vm-disks-tls")
    with running_drill(root, "--nbd-listen", f"{routable_address()}:{free_port()}") as built:
        yield built


def test_a_one_disk_vm_is_mounted_at_the_mount_point_itself_over_tls(
    tls_drill: Drill, guest: Guest, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """One disk: no suffix (SPEC 2 suffixes only several). The export is ``nbds://``: the
    agent trusts the appliance's pinned certificate and nbdfuse reads over TLS."""
    folder = tmp_path_factory.mktemp("onedisk")
    name = f"tandem-1d-{uuid.uuid4().hex[:8]}"
    disk = make_ext4_disk(
        folder / "vda.qcow2", 32, {"only.txt": "the one disk\n"}, partitioned=False,
        header=b"TANDEM-DISK one\n",
    )  # fmt: skip
    xml = folder / "domain.xml"
    xml.write_text(vmguest.domain_xml(name, guest.boot, [disk], "one"))
    vmguest.virsh("define", str(xml))
    console = vmguest.start_with_console(name)
    try:
        assert console.expect("TANDEM-BOOT").endswith("existing")
        console.expect("TANDEM-SUM")
        a, b = tls_drill.a, tls_drill.b
        a("app", "add", "vm1", "--host", "host1", "--kind", "vm", "--domain", name)
        a("app", "protect", "vm1", "--template", "mirrored")
        snap = a("capture", "vm1")["image"]
        wait_for(lambda: any(i["id"] == snap["id"] for i in b("images", "vm1")), 120, "the replica")
    finally:
        console.close()
        vmguest.remove_domain(name)
    where = tmp_path / "one"
    done = b("test-failover", "vm1", "--host", "host2", "--mount-point", str(where))["job"]
    assert done["status"] == "succeeded", done["message"]
    assert done["result"]["nbd_uri"].startswith("nbds://")
    assert done["result"]["paths"] == [str(where)]
    assert (where / "only.txt").read_text() == "the one disk\n"
    (where / "late.txt").write_text("written back at the unmount\n")  # not synced
    b("unmount", done["result"]["image"])
    said = (tls_drill.dr_agent.directory / "disks" / f"{done['result']['image']}.log").read_text()
    assert not said.strip(), said  # the unmount's writes went through the export
    assert not where.exists()


def test_a_disk_without_a_file_system_fails_the_mount_naming_it(
    drill: Drill, replica: dict[str, Any], tmp_path: Path
) -> None:
    """The production guest's disk holds its pattern, no file system: the mount fails
    naming the disk and leaves nothing (no mount point, loop device, FUSE file or row)."""
    b = drill.b
    loops_before = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    where = tmp_path / "nofs"
    images = {i["id"] for i in b("images", "vmx")}
    failed = b.run(
        "mount", replica["id"], "--host", "host2", "--mount-point", str(where), check=False
    )
    assert failed.code != 0
    assert "disk vda of image" in failed.error and "no file system" in failed.error, failed.error
    assert not where.exists()
    assert subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout == loops_before
    assert "nbdfuse" not in Path("/proc/mounts").read_text()
    assert {i["id"] for i in b("images", "vmx")} == images


def test_failover_onto_an_existing_vm_starts_it_on_the_export(
    drill: Drill, guest: Guest, replica: dict[str, Any]
) -> None:
    """Last in this module (the app stays failed over): ``failover --vm --power-on`` with
    both confirmations starts the operator's domain, its identity kept, on the export."""
    b = drill.b
    target = define_target(guest, "fo", 1)
    try:
        done = b(
            "failover", "vmx", "--host", "host2", "--vm", target.name, "--power-on",
            "--confirm", "FAILOVER", *CONFIRM,
        )  # fmt: skip
        job = done["job"]
        assert job["status"] == "succeeded", job["message"]
        vm = job["result"]["vm"]
        assert vm["existing"] is True and vm["running"] is True and vm["was_running"] is False
        assert vm["uuid"] == uuid_in(target.xml)
        assert "running" in vmguest.virsh("domstate", target.name).stdout
        xml = domain_xml(target.name) or ""
        assert "protocol='nbd'" in xml and macs(xml) == macs(target.xml)
        assert [a["state"] for a in b("apps") if a["name"] == "vmx"] == ["failed-over"]
    finally:
        vmguest.remove_domain(target.name)
