"""NBD data path benchmark (issue 15, item 1): a presented virtual copy against qemu-nbd.

One 512 MiB volume (alternating MiB of random and text-like bytes, so the pool holds zstd
chunks, as a real disk's would) is captured into a pool. Then, in the same run:

- tandem: a child process does what a test failover does at the DR appliance (an
  ``Overlay`` over the captured image, exported by ``NbdServer`` on loopback) and serves
  until told to stop. A fresh copy for each workload.
- qemu-nbd on the same bytes: the raw volume file for the reads; for the writes a qcow2
  overlay over it (the copy-on-write peer of a virtual copy; a fresh one each time).

fio's NBD engine (libnbd) runs each workload for ``RUNTIME`` seconds after ``RAMP``
seconds of warm-up, at iodepth 16: 4 KiB random read, 4 KiB random write, 1 MiB
sequential read. Warm page cache for both: the pool's chunk files and the volume file sit
in it. A second write row flushes every 32 writes, as a database's commits do (the
durability path: FLUSH makes writes and the dirty bitmap durable). The last row repeats
the random read without warm-up on a fresh server: it includes the decoding of every
chunk on first touch (tandem's chunk cache starts empty; qemu-nbd's page cache is warm all
the same). Target: at least 0.8× qemu-nbd on each.

``python -m bench.nbd serve POOL MANIFEST_HEX OVERLAY_DIR`` is the tandem server alone
(prints its URI, serves until stdin closes): handy under ``py-spy``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import Config, DataSource, MiB, Report, have, log, settle
from bench.replication import add_row

S = "NBD data path · presented copy vs qemu-nbd (fio, libnbd engine)"
SIZE = 512 * MiB
RUNTIME = 10  # seconds each workload is measured
RAMP = 2  # seconds of warm-up before it
TARGET = "≥ 0.8× qemu-nbd"


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int
    ramp: int = RAMP  # 0: measured from the server's first request (its cache cold)
    fsync: int = 0  # a FLUSH after every this many writes (0: none)

    @property
    def writes(self) -> bool:
        return "write" in self.rw


WORKLOADS = (
    Workload("4 KiB random read, iodepth 16", "randread", "4k", 16),
    Workload("4 KiB random write, iodepth 16", "randwrite", "4k", 16),
    Workload("4 KiB random write, iodepth 16, FLUSH every 32", "randwrite", "4k", 16, fsync=32),
    Workload("1 MiB sequential read, iodepth 16", "read", "1m", 16),
    Workload("4 KiB random read, iodepth 16, cold (no warm-up)", "randread", "4k", 16, 0),
)


@dataclass
class Result:
    iops: float
    bandwidth: float  # bytes per second


def write_volume(path: Path, data: DataSource) -> None:
    """SIZE bytes: random and text-like MiB in turn."""
    with open(path, "wb") as fh:
        for i in range(SIZE // MiB):
            fh.write(data.random("nbd", i, MiB) if i % 2 else data.text("nbd", i, MiB))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


def fio(uri: str, w: Workload) -> Result:
    cmd = [
        "fio",
        "--name=nbd",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={w.rw}",
        f"--bs={w.bs}",
        f"--iodepth={w.iodepth}",
        f"--size={SIZE}",
        "--time_based",
        f"--runtime={RUNTIME}",
        f"--ramp_time={w.ramp}",
        "--randrepeat=0",
        f"--fsync={w.fsync}",
        "--output-format=json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUNTIME + RAMP + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
    side = job["write" if w.writes else "read"]
    return Result(iops=float(side["iops"]), bandwidth=float(side["bw_bytes"]))


class TandemServer:
    """The child process serving a fresh virtual copy of the image."""

    def __init__(self, pool: Path, manifest: str, overlay: Path) -> None:
        shutil.rmtree(overlay, ignore_errors=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.nbd", "serve", str(pool), manifest, str(overlay)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("nbd://"):
            self.stop()
            raise RuntimeError(f"the tandem NBD server did not start: {line!r}")
        self.uri = line

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class QemuNbd:
    def __init__(self, image: Path, fmt: str) -> None:
        self.port = free_port()
        listen = ("-b", "127.0.0.1", "-p", str(self.port))
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-f", fmt, "-t", "-x", "bench", *listen, str(image)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_port(self.port, self.proc)
        self.uri = f"nbd://127.0.0.1:{self.port}/bench"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(root: Path, report: Report, cfg: Config) -> None:
    from tandem.storage.pool import ChunkPool
    from tandem.storage.volume import capture_volume

    volume = root / "volume.raw"
    log("nbd: writing the 512 MiB volume and capturing it")
    write_volume(volume, DataSource(cfg.seed))
    pool = ChunkPool.create(root / "pool")
    mid, _, _ = capture_volume(pool, volume)
    settle()
    for w in WORKLOADS:
        tandem = TandemServer(root / "pool", mid.hex(), root / "overlay")
        try:
            ours = fio(tandem.uri, w)
        finally:
            tandem.stop()
        settle()
        if w.writes:
            qcow = root / "peer.qcow2"
            qcow.unlink(missing_ok=True)
            base = ("-b", str(volume), "-F", "raw")
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", *base, str(qcow)],
                check=True,
            )
            peer_server = QemuNbd(qcow, "qcow2")
        else:
            peer_server = QemuNbd(volume, "raw")
        try:
            peer = fio(peer_server.uri, w)
        finally:
            peer_server.stop()
        settle()
        ratio = ours.iops / peer.iops if peer.iops else 0.0
        log(f"nbd: {w.name}: tandem {ours.iops:,.0f} IOPS, qemu-nbd {peer.iops:,.0f} IOPS")

        def show(r: Result) -> str:
            return f"{r.iops:,.0f} IOPS · {r.bandwidth / 1e6:,.0f} MB/s"

        add_row(
            report,
            S,
            w.name,
            tandem=show(ours),
            peer=f"qemu-nbd {show(peer)}",
            ratio=f"{ratio:.2f}×",
            target=TARGET,
            values=dict(
                tandem_iops=ours.iops,
                tandem_bytes_per_second=ours.bandwidth,
                qemu_nbd_iops=peer.iops,
                qemu_nbd_bytes_per_second=peer.bandwidth,
                ratio=ratio,
                runtime_seconds=RUNTIME,
                ramp_seconds=w.ramp,
            ),
        )


NOTES = (
    "NBD: a 512 MiB volume (random and text-like MiB in turn) captured into a pool; tandem "
    "serves a fresh virtual copy of it (Overlay + NbdServer in a child process, as a test "
    "failover does), qemu-nbd serves the raw file for reads and a fresh qcow2 overlay over "
    f"it for writes. fio --ioengine=nbd, {RUNTIME} s after {RAMP} s of warm-up each, one "
    "connection; warm page cache for both. 'cold': no warm-up, so tandem decodes each 4 MiB "
    "chunk on its first touch (its chunk cache, 1 GiB by default, holds this volume whole "
    "after that).",
)


def run(cfg: Config, report: Report) -> None:
    report.notes.extend(NOTES)
    missing = [p for p in ("fio", "qemu-nbd", "qemu-img") if not have(p)]
    if missing:
        add_row(
            report,
            S,
            "not run",
            tandem=f"{', '.join(missing)} missing (apt-get install fio qemu-utils)",
            peer="—",
        )
        return
    root = Path(tempfile.mkdtemp(prefix="nbd-", dir=cfg.workdir))
    try:
        measure(root, report, cfg)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def serve(pool_dir: str, manifest_hex: str, overlay_dir: str) -> None:
    """Serve a fresh virtual copy of an image until stdin closes (prints the URI first)."""
    from tandem.appliance.nbd import NbdServer
    from tandem.storage.manifest import VolumeManifest, load_manifest
    from tandem.storage.overlay import Overlay
    from tandem.storage.pool import ChunkPool

    pool = ChunkPool(pool_dir)
    mid = bytes.fromhex(manifest_hex)
    manifest = load_manifest(pool, mid)
    assert isinstance(manifest, VolumeManifest)
    overlay = Overlay.create(Path(overlay_dir), pool, manifest, mid)
    with NbdServer("127.0.0.1", 0) as server:
        print(server.add_export("copy", overlay), flush=True)
        sys.stdin.read()
        server.remove_export("copy")
    overlay.delete()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        serve(*sys.argv[2:5])
    else:
        sys.exit(f"usage: {os.path.basename(sys.argv[0])} serve POOL MANIFEST_HEX OVERLAY_DIR")
