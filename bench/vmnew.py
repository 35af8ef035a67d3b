"""Test failover to a new VM at 1 / 4 / 16 GiB: time until the domain runs, on the appliance's
NBD export (nothing copied) against copying the disk with ``qemu-img convert`` first.

Set-up (``tandem.drill.lab``, as in the replication section): appliances ``prod`` and ``dr``
paired, agents ``prod-host`` and ``dr-host`` (both on this machine's libvirt,
``qemu:///system``), a mirroring template, and a directory storage pool at the DR host. For
each size a guest (``tests/vmguest.py``) gets a qcow2 disk with one MiB of data in every
8 MiB written by ``qemu-io`` (so a copy has data to move, an eighth of the disk), is started
paused (a pull-mode backup needs a running domain; its guest need not run), added as a vm
app, captured and replicated. Then at DR, with nothing else running:

- ``test-failover APP --host dr-host --new-vm NAME --pool P --power-on``: the VM's disks
  are slices of the appliance's NBD export. Wall time from the API call until the job is
  seen succeeded with the domain running.
- The same with ``--action copy``: the agent first copies each disk from the export into
  a qcow2 volume of P with ``qemu-img convert`` (zeros skipped), then defines and starts
  the domain on it: the "copy the disk first" way, through the same API.

Each new VM is withdrawn (``unmount``) after its measure; target: the NBD time flat in the
disk size (16 GiB within 1.2× of 1 GiB).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import Config, GiB, MiB, Report, fmt_seconds, have, log
from bench.replication import TwoSites, add_row, run_in_lab, wait_job

S = "vmnew"
SIZES_GIB = (1, 4, 16)
QUICK_SIZES_GIB = (1, 2, 4)
STRIDE = 8 * MiB


def prefill(disk: Path, size: int) -> None:
    """One MiB of a distinct pattern at the start of every ``STRIDE``."""
    args = []
    for k, offset in enumerate(range(0, size, STRIDE)):
        args += ["-c", f"write -P {k % 250 + 1} {offset} {MiB}"]
    subprocess.run(["qemu-io", *args, str(disk)], check=True, capture_output=True, timeout=3600)


def run(cfg: Config, report: Report) -> None:
    if not (have("virsh") and have("qemu-img") and have("qemu-io")):
        add_row(report, S, "not run", tandem="libvirt or qemu-utils missing", peer="—")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import vmguest

    root = cfg.workdir / "vmnew"
    root.mkdir(parents=True, exist_ok=True)
    sizes = QUICK_SIZES_GIB if cfg.quick else SIZES_GIB
    try:
        with vmguest.libvirt_session():
            run_in_lab(root / "lab", report, (S,), lambda lab: _bench(lab, root, sizes, report))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _timed_failover(
    sites: TwoSites, app: str, name: str, pool: str, copy: bool
) -> tuple[float, dict[str, Any]]:
    params: dict[str, Any] = {
        "host": "dr-host",
        "new_vm": name,
        "pool": pool,
        "power_on": True,
        **({"action": "copy"} if copy else {}),
    }
    t0 = time.monotonic()
    started = sites.dr_api.post(f"/api/v1/apps/{app}/test-failover", params)
    job = wait_job(sites.dr_api, started["job"]["id"], poll=0.05)
    seconds = time.monotonic() - t0
    vm = (job.get("result") or {}).get("vm") or {}
    if not vm.get("running"):
        raise RuntimeError(f"test failover {job['id']} left VM {name} not running")
    return seconds, job


def _bench(lab: Any, root: Path, sizes: tuple[int, ...], report: Report) -> None:
    from tests import vmguest

    sites = TwoSites(lab, dr_host=True)
    sites.start()
    boot = vmguest.guest_boot(root)
    pool = f"tandem-bench-{uuid.uuid4().hex[:8]}"
    (root / "pool").mkdir()
    vmguest.virsh("pool-define-as", pool, "dir", "--target", str(root / "pool"))
    vmguest.virsh("pool-start", pool)
    made: list[str] = []
    results: dict[int, tuple[float, float]] = {}
    try:
        for gib in sizes:
            size = gib * GiB
            app = f"vm{gib}g"
            source = f"{pool}-src{gib}"
            disk = vmguest.make_disk(root / f"{app}.qcow2", size // MiB)
            log(f"vmnew: {gib} GiB disk, 1 MiB of data every 8 MiB (qemu-io)")
            prefill(disk, size)
            (root / f"{app}.xml").write_text(vmguest.domain_xml(source, boot, [disk], app))
            vmguest.virsh("define", str(root / f"{app}.xml"))
            made.append(source)
            vmguest.virsh("start", "--paused", source)
            sites.prod_api.post(
                "/api/v1/apps", {"name": app, "host": "prod-host", "kind": "vm", "domain": source}
            )
            sites.prod_api.post(f"/api/v1/apps/{app}/protect", {"template": "mirrored"})
            log(f"vmnew: capture and replicate {app}")
            sites.capture_and_replicate(app)
            vmguest.virsh("destroy", source)
            timed = []
            for copy in (False, True):
                name = f"{pool}-{app}-{'copy' if copy else 'nbd'}"
                made.append(name)
                seconds, job = _timed_failover(sites, app, name, pool, copy)
                log(f"vmnew: {gib} GiB {'copy' if copy else 'NBD'}: running in {seconds:.2f} s")
                vmguest.virsh("destroy", name, check=False)
                sites.dr_api.post(f"/api/v1/images/{job['result']['image']}/unmount")
                timed.append(seconds)
            results[gib] = (timed[0], timed[1])
    finally:
        for name in made:
            vmguest.remove_domain(name)
        vmguest.virsh("pool-destroy", pool, check=False)
        vmguest.virsh("pool-undefine", pool, check=False)
    first = results[sizes[0]][0]
    for gib in sizes:
        nbd, copied = results[gib]
        add_row(
            report,
            S,
            f"test failover to a new VM, {gib} GiB disk: until the domain runs",
            tandem=f"{fmt_seconds(nbd)} (NBD disks)",
            peer=f"{fmt_seconds(copied)} (qemu-img convert first)",
            ratio=f"{nbd / first:.2f}× the {sizes[0]} GiB time; {copied / nbd:.1f}× faster",
            target="flat (≤ 1.2×)",
            values={"gib": gib, "nbd_seconds": nbd, "copy_seconds": copied},
        )
