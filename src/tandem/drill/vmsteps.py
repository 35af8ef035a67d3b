"""`tandem demo --vm`: the drill with a real guest at production (``guest``: a Debian kernel
and a busybox initramfs under QEMU/TCG, through libvirt).

The steps of ``steps.STEPS`` run as they are; then a ``vm`` app joins the two sites: the
guest is started at production (it formats its disk with a known pattern and prints the
disk's md5 on its serial console), protected with the mirroring template, captured (a full,
then an incremental capture after the guest rewrote 1 MiB), mirrored to dr, test-failed-over
to a *new VM* on host2 whose disks are the appliance's NBD exports, booted there — it must
print the sum the production guest printed at the capture — and the test ended (the test VM
goes with the copy). Both hosts share this machine's libvirt (``qemu:///system``), so the new
VM has a name of its own. The guest is removed when the demo ends.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path
from typing import Any

from tandem.domain.lifecycle import AppKind
from tandem.domain.units import human_bytes
from tandem.transport.api import AppIn, CaptureIn, PresentIn, ProtectIn

from . import guest
from .steps import (
    STEPS,
    TEMPLATE,
    Context,
    Step,
    StepFailed,
    _doc,
    _image_of,
    _withdraw,
)

VM_APP = "vm"
DISK_MIB = 64
"""The guest's disk (qcow2, sparse: the guest writes ``guest.PATTERN_MIB`` of it)."""
BOOT_TIMEOUT = 300.0
"""Seconds a guest has to boot and print its sum under TCG on a busy machine."""


def libvirt_missing() -> str | None:
    """Why ``--vm`` cannot run here (what to install or start), or None when it can."""
    missing = [
        tool
        for tool in ("virsh", "qemu-img", "qemu-system-x86_64", "cpio", "apt-get")
        if shutil.which(tool) is None
    ]
    if not Path("/bin/busybox").exists():
        missing.append("/bin/busybox")
    if missing:
        return (
            f"{', '.join(missing)} not found: install libvirt-daemon-system libvirt-clients "
            "qemu-system-x86 qemu-utils cpio busybox-static (`make tools` does, as root)"
        )
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is missing: install tandem's vm extra (pip install 'tandem[vm]')"
    if not guest.libvirt_answers():
        return (
            f"libvirt does not answer at {guest.URI}: start it (virtlogd -d; libvirtd -d) "
            "and run the demo as a user who may manage it (root)"
        )
    return None


def _console_line(console: guest.Console, prefix: str) -> str:
    try:
        return console.expect(prefix, BOOT_TIMEOUT)
    except guest.ConsoleTimeout as exc:
        raise StepFailed(str(exc)) from None


def _console(ctx: Context) -> guest.Console:
    console = ctx.facts.get("vm_console")
    if not isinstance(console, guest.Console):
        raise StepFailed("the production guest is not running")
    return console


def step_start_guest(ctx: Context) -> str:
    folder = ctx.lab.root / "guest"
    folder.mkdir()
    name = re.sub(r"[^A-Za-z0-9._+-]", "-", f"tandem-demo-vm-{ctx.lab.root.name}")[:58]
    ctx.say("building the guest: a Debian cloud kernel (downloaded once) + busybox initramfs")
    boot = guest.guest_boot(folder)
    disk = guest.make_disk(folder / "vda.qcow2", DISK_MIB)
    xml = folder / "domain.xml"
    xml.write_text(guest.domain_xml(name, boot, [disk], "production"))
    guest.remove_domain(name)
    ctx.lab.on_close(f"remove the guest {name}", lambda: guest.remove_domain(name))
    ctx.say(f"[dim]{ctx.prod.host}# virsh define {xml}; virsh start {name}[/]")
    guest.virsh("define", str(xml))
    console = guest.start_with_console(name)
    ctx.lab.on_close("close the guest's console", console.close)
    ctx.facts.update(vm_console=console, vm_domain=name, vm_boot=boot)
    _console_line(console, "TANDEM-BOOT")
    ctx.facts["vm_sum"] = _console_line(console, "TANDEM-SUM").split()[1]
    return (
        f"guest {name} running under QEMU at {ctx.prod.host}: disk {disk.name} "
        f"({DISK_MIB} MiB), md5 {ctx.facts['vm_sum']}"
    )


def step_protect_vm(ctx: Context) -> str:
    prod, name = ctx.prod, str(ctx.facts["vm_domain"])
    domains = list(prod.api.vms(prod.host).get("domains", []))
    ctx.command(prod, f"vms --host {prod.host}")
    ctx.check(
        "vm_listed",
        any(d["name"] == name for d in domains),
        f"{prod.host} does not list the domain {name}: {[d['name'] for d in domains]}",
    )
    ctx.command(prod, f"app add {VM_APP} --host {prod.host} --kind vm --domain {name}")
    prod.api.add_app(AppIn(name=VM_APP, host=prod.host, kind=AppKind.VM, domain=name))
    ctx.command(prod, f"app protect {VM_APP} --template {TEMPLATE}")
    row = prod.api.protect(VM_APP, ProtectIn(template=TEMPLATE))
    ctx.check("vm_managed", row.state.value == "managed", f"{VM_APP} is {row.state.value}")
    return f"{VM_APP} (domain {name}) managed, mirrored to dr"


def _capture_vm(ctx: Context, label: str, tag: str) -> dict[str, Any]:
    """Capture the running guest, wait for its replication, check the replica is at dr."""
    prod, dr = ctx.prod, ctx.dr
    ctx.command(prod, f'capture {VM_APP} --label "{label}"')
    (job,) = ctx.wait_jobs(prod, [ctx.start_job(prod.api.capture(VM_APP, CaptureIn(label=label)))])
    image_id = _image_of(job)
    ctx.images[f"{VM_APP}-{tag}"] = image_id
    ctx.facts[f"vm_sum_{image_id}"] = ctx.facts["vm_sum"]
    mirror = (job.get("result") or {}).get("mirror_job")
    if not mirror:
        raise StepFailed(f"capture {job['id']} of {VM_APP} queued no replication")
    ctx.wait_jobs(prod, [_doc(prod.api.job(str(mirror)))])
    replicas = {i["id"] for i in ctx.images_of(dr, VM_APP) if i["kind"] == "replica"}
    ctx.check(
        f"replica_{VM_APP}_{tag}",
        image_id in replicas,
        f"the replication succeeded but dr holds no replica {image_id} of {VM_APP}",
    )
    return job


def step_capture_vm(ctx: Context) -> str:
    full = _capture_vm(ctx, "vm first, full", "full")
    full_read = int((full.get("result") or {}).get("bytes_read") or 0)
    console = _console(ctx)
    console.send("rewrite dr-demo")
    ctx.facts["vm_sum"] = _console_line(console, "TANDEM-SUM").split()[1]
    ctx.say(f"the guest rewrote 1 MiB of its disk: md5 {ctx.facts['vm_sum']}")
    incr = _capture_vm(ctx, "vm second, incremental", "incr")
    read = int((incr.get("result") or {}).get("bytes_read") or 0)
    ctx.transfers["vm-capture"] = {"full": full_read, "incremental": read}
    ctx.check(
        "vm_incremental_reads_less",
        read < full_read,
        f"the incremental capture read {read} bytes, not less than the full one's {full_read}",
    )
    return (
        f"full capture read {human_bytes(full_read)}, the one after the guest's rewrite "
        f"{human_bytes(read)} (the dirty bitmap); both replicated to dr"
    )


def step_test_failover_vm(ctx: Context) -> str:
    dr = ctx.dr
    new = f"{ctx.facts['vm_domain']}-test"
    guest.remove_domain(new)
    ctx.lab.on_close(f"remove the test VM {new}", lambda: guest.remove_domain(new))
    ctx.command(dr, f"test-failover {VM_APP} --host {dr.host} --new-vm {new}")
    job = ctx.run_job(dr, dr.api.test_failover(VM_APP, PresentIn(host=dr.host, new_vm=new)))
    image = ctx.image(dr, _image_of(job))
    ctx.images[f"{VM_APP}-test"] = image["id"]
    replica = str(image.get("parent"))
    ctx.check(
        "test_vm_of_newest_replica",
        replica == ctx.images[f"{VM_APP}-incr"],
        f"the test VM is of {replica}, not the newest replica {ctx.images[f'{VM_APP}-incr']}",
    )
    ctx.say(f"[dim]{dr.host}# virsh start {new}[/]")
    console = guest.start_with_console(new)
    try:
        booted = _console_line(console, "TANDEM-BOOT")
        read = _console_line(console, "TANDEM-SUM").split()[1]
    finally:
        console.close()
    wrote = str(ctx.facts[f"vm_sum_{replica}"])
    ctx.data_equal["dr_test_vm"] = read == wrote and booted.endswith("existing")
    ctx.check(
        "equal_dr_test_vm",
        ctx.data_equal["dr_test_vm"],
        f"the test VM read md5 {read} ({booted}), production wrote {wrote}",
    )
    ctx.say(f"[green]✓[/] the new VM {new} at {dr.host} read md5 {read}: what production wrote")
    ctx.facts["vm_test"] = new
    return (
        f"new VM {new} booted at {dr.host} from the NBD export of {replica}: it read what "
        "production wrote"
    )


def step_end_test_vm(ctx: Context) -> str:
    dr = ctx.dr
    image_id, new = ctx.images[f"{VM_APP}-test"], str(ctx.facts["vm_test"])
    _withdraw(ctx, dr, image_id)
    left = guest.virsh("dominfo", new, check=False).returncode == 0
    ctx.check("test_vm_removed", not left, f"the test VM {new} is still defined")
    return f"{image_id} unmounted and deleted; the test VM {new} went with it"


def step_stop_guest(ctx: Context) -> str:
    name = str(ctx.facts["vm_domain"])
    with contextlib.suppress(OSError):
        _console(ctx).send("off")
    guest.remove_domain(name)
    return f"guest {name} powered off and undefined (the vm app keeps its images)"


VM_STEPS: list[Step] = [
    Step("start-guest", "start a real guest at production (libvirt)", step_start_guest),
    Step("protect-vm", "protect the guest as a vm app", step_protect_vm),
    Step("capture-vm", "capture + replication of the guest", step_capture_vm),
    Step("test-failover-vm", "test failover of the guest to a new VM", step_test_failover_vm),
    Step("end-test-vm", "end the VM test", step_end_test_vm),
    Step("stop-guest", "power off the production guest", step_stop_guest),
]


def vm_drill() -> list[Step]:
    """``steps.STEPS``, then the VM steps (after the failback: the drill's RPO and failover
    measures stay those of the sample app)."""
    return [*STEPS, *VM_STEPS]
