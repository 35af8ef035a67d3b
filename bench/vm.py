"""VM capture: a running guest's 4 GiB disk, full and after the guest rewrote 1% of it.

A real guest (``tests/vmguest.py``: Debian kernel, busybox initramfs) under libvirt + QEMU
(TCG) with a qcow2 disk prefilled by ``qemu-io`` (the host writes the data before boot: a
guest would take minutes under TCG). The agent's capture code (``agent.vm.capture``:
checkpoint, pull-mode backup, NBD reads) writes into a local pool: first capture (reads
every allocated extent), then, after the guest rewrote 1% of the disk in 64 KiB blocks spread
over it, the incremental capture, which must read about what was written.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.common import Config, GiB, MiB, Report, Row, fmt_bytes, log

S = "vm"


def run(cfg: Config, report: Report) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import vmguest

    from tandem.agent import vm
    from tandem.storage.manifest import VolumeManifest, load_manifest
    from tandem.storage.pool import ChunkPool

    size = 4 * GiB
    with vmguest.libvirt_session():
        folder = cfg.workdir / "vm"
        folder.mkdir()
        boot = vmguest.guest_boot(folder)
        disk = vmguest.make_disk(folder / "vda.qcow2", size // MiB)
        log(f"vm: prefilling the {size // GiB} GiB disk with qemu-io")
        subprocess.run(
            [
                "qemu-io",
                *(
                    arg
                    for k in range(size // (256 * MiB))
                    for arg in ("-c", f"write -P {k + 1} {k * 256 * MiB} {256 * MiB}")
                ),
                str(disk),
            ],
            check=True,
            capture_output=True,
            timeout=1800,
        )
        name = f"tandem-bench-{int(time.time())}"
        xml = folder / "domain.xml"
        xml.write_text(vmguest.domain_xml(name, boot, [disk], "bench"))
        vmguest.virsh("define", str(xml))
        try:
            console = vmguest.start_with_console(name)
            console.expect("TANDEM-BOOT", timeout=600)
            pool = ChunkPool.create(folder / "pool")
            events: list[str] = []

            def emit(event: dict[str, object]) -> None:
                if event.get("event") == "log":
                    events.append(str(event.get("text")))

            t0 = time.monotonic()
            full = vm.capture(name, "full", None, pool, None, emit, lambda d, t: None)
            full_s = time.monotonic() - t0
            base_id = bytes.fromhex(str(full["manifest"]))
            base = load_manifest(pool, base_id)
            assert isinstance(base, VolumeManifest)
            blocks = size // 100 // (64 * 1024)
            log(f"vm: the guest rewrites {blocks} blocks of 64 KiB (1%)")
            console.send(f"scatter {blocks}")
            console.expect("TANDEM-SCATTERED", timeout=900)
            t0 = time.monotonic()
            inc = vm.capture(name, "incr", base, pool, base_id, emit, lambda d, t: None)
            inc_s = time.monotonic() - t0
            console.close()
        finally:
            vmguest.remove_domain(name)
    written = blocks * 64 * 1024
    full_read = int(full["stats"]["bytes_read"])
    inc_read = int(inc["stats"]["bytes_read"])
    report.add(
        Row(
            S,
            f"VM capture, {size // GiB} GiB disk, first (full read)",
            f"{fmt_bytes(full_read)} read, {full_s:.1f} s",
            "—",
            "—",
            "—",
            {"bytes_read": full_read, "seconds": full_s},
        )
    )
    report.add(
        Row(
            S,
            f"VM capture after the guest rewrote 1% ({fmt_bytes(written)})",
            f"{fmt_bytes(inc_read)} read, {inc_s:.2f} s",
            f"full read {fmt_bytes(full_read)}, {full_s:.1f} s",
            f"{inc_read / written:.2f}× written",
            "≈ written bytes",
            {"bytes_read": inc_read, "seconds": inc_s, "written": written},
        )
    )
