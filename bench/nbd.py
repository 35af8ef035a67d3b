"""NBD data path benchmark (issue 15, item 1): a presented virtual copy against qemu-nbd.

One 512 MiB volume (alternating MiB of random and text-like bytes, so the pool holds zstd
chunks, as a real disk's would) is captured into a pool. Then, in the same run:

- tandem, as the operator presents it: an appliance daemon and an agent (``tandem.drill.lab``)
  on loopback; the volume is captured with ``tandem capture`` and each workload gets a
  fresh virtual copy from ``tandem mount IMAGE --host H --action map-only`` (the core that
  test failover and failover share, ``operations.present``: an ``Overlay`` exported by the
  daemon's NBD server), its ``nbd_uri`` from the command's JSON, and ``tandem unmount``
  after. The TLS row alone uses a child process serving the same kind of copy
  (``python -m bench.nbd serve``), whose certificate the peer's credentials are made from.
- qemu-nbd on the same bytes: the raw volume file for the reads; for the writes a qcow2
  overlay over it (the copy-on-write peer of a virtual copy; a fresh one each time).

fio's NBD engine (libnbd) runs each workload for ``RUNTIME`` seconds after ``RAMP``
seconds of warm-up, at iodepth 16: 4 KiB random read, 4 KiB random write, 1 MiB
sequential read. Warm page cache for both: the pool's chunk files and the volume file sit
in it. A second write row flushes every 32 writes, as a database's commits do (the
durability path: FLUSH makes writes and the dirty bitmap durable). The last row repeats
the random read without warm-up on a fresh server: it includes the decoding of every
chunk on first touch (tandem's chunk cache starts empty; qemu-nbd's page cache is warm all
the same). Target: at least 0.8× qemu-nbd on each. One more row reads over TLS
(``nbds://``: NBD STARTTLS, the appliance's self-signed certificate) against qemu-nbd with
TLS credentials made from the same certificate, as a DR host that is not the appliance
reads its copy.

``python -m bench.nbd serve POOL MANIFEST_HEX OVERLAY_DIR [TLS_DIR]`` is the tandem server
alone (prints its URI, serves until stdin closes; over TLS with TLS_DIR/server-cert.pem
and server-key.pem if given): handy under ``py-spy``.
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
from typing import Any

from bench.common import Config, DataSource, MiB, Report, have, log, run_measured, settle
from bench.replication import add_row
from tandem.drill.lab import Lab, tandem_argv

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
    tls: bool = False  # over nbds:// (STARTTLS) for both servers

    @property
    def writes(self) -> bool:
        return "write" in self.rw


WORKLOADS = (
    Workload("4 KiB random read, iodepth 16", "randread", "4k", 16),
    Workload("4 KiB random write, iodepth 16", "randwrite", "4k", 16),
    Workload("4 KiB random write, iodepth 16, FLUSH every 32", "randwrite", "4k", 16, fsync=32),
    Workload("1 MiB sequential read, iodepth 16", "read", "1m", 16),
    Workload("4 KiB random read, iodepth 16, cold (no warm-up)", "randread", "4k", 16, 0),
    Workload("4 KiB random read, iodepth 16, over TLS (nbds://)", "randread", "4k", 16, tls=True),
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


def fio(uri: str, w: Workload, tls: Path | None = None) -> Result:
    """Run fio's NBD engine on ``uri``. fio's engine refuses ``?tls-certificates=`` (local
    files in a URI), so over TLS libnbd finds the certificate where it looks by default,
    ``$HOME/.pki/libnbd/ca-cert.pem``, with HOME pointed at ``tls``."""
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
    env = {**os.environ, "HOME": str(tls)} if tls is not None else None
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=RUNTIME + RAMP + 120, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
    side = job["write" if w.writes else "read"]
    return Result(iops=float(side["iops"]), bandwidth=float(side["bw_bytes"]))


class DaemonSite:
    """An appliance and an agent serving the operator's path (``tandem.drill.lab``)."""

    def __init__(self, lab: Lab, volume: Path, scratch: Path) -> None:
        self.scratch = scratch
        self.site = lab.add("appliance", "site")
        self.host = lab.add("agent", "host")
        lab.up(self.site, self.host)
        agent = ("--url", self.host.url, "--token", self.host.token)
        self.cli("host", "add", self.host.name, *agent, "--fingerprint", self.host.fingerprint)
        self.cli("template", "add", "bench")
        self.cli(
            "app", "add", "vol", "--host", self.host.name, "--kind", "volume", "--path", str(volume)
        )
        self.cli("app", "protect", "vol", "--template", "bench")
        self.image = str(self.cli("capture", "vol")["job"]["image"])

    def cli(self, *args: str) -> dict[str, Any]:
        res = run_measured(
            tandem_argv(*args, "--json"), scratch=self.scratch, env=self.site.env()
        ).check(f"tandem {' '.join(args)}")
        doc: dict[str, Any] = json.loads(res.stdout)
        return doc


class DaemonExport:
    """A fresh virtual copy presented by the appliance daemon (``tandem mount``)."""

    def __init__(self, site: DaemonSite) -> None:
        self.site = site
        doc = site.cli("mount", site.image, "--host", site.host.name, "--action", "map-only")
        uri = doc.get("nbd_uri")
        if not isinstance(uri, str) or not uri.startswith("nbd://"):
            raise RuntimeError(f"tandem mount gave no plain nbd:// export: {uri!r}")
        self.uri = uri
        self.mounted = str(doc["job"]["image"])

    def stop(self) -> None:
        self.site.cli("unmount", self.mounted)


class TandemServer:
    """The child process serving a fresh virtual copy of the image (the TLS row)."""

    def __init__(self, pool: Path, manifest: str, overlay: Path, tls: Path | None) -> None:
        shutil.rmtree(overlay, ignore_errors=True)
        args = [str(pool), manifest, str(overlay), *([str(tls)] if tls else [])]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.nbd", "serve", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith(("nbd://", "nbds://")):
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
    def __init__(self, image: Path, fmt: str, tls: Path | None = None) -> None:
        self.port = free_port()
        listen = ("-b", "127.0.0.1", "-p", str(self.port))
        creds: tuple[str, ...] = ()
        if tls is not None:
            obj = f"tls-creds-x509,id=tls0,dir={tls / 'qemu'},endpoint=server,verify-peer=off"
            creds = ("--object", obj, "--tls-creds", "tls0")
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-f", fmt, "-t", "-x", "bench", *listen, *creds, str(image)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_port(self.port, self.proc)
        self.uri = f"nbd://127.0.0.1:{self.port}/bench"
        if tls is not None:
            self.uri = f"nbds://127.0.0.1:{self.port}/bench"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def make_tls_dir(directory: Path) -> Path:
    """TLS credentials for both servers, and a client trust file naming both.

    tandem's: a self-signed certificate as ``init`` makes an appliance's (server-cert.pem,
    server-key.pem). qemu-nbd will not serve with a certificate marked a CA, as that one
    is, so it gets a leaf of the same kind of key signed by it (DIR/qemu/); the client
    trusts tandem's certificate alone (ca-cert.pem), which covers both."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tandem.transport.tls import make_self_signed

    directory.mkdir()
    make_self_signed(directory / "server-cert.pem", directory / "server-key.pem", "bench", [])
    qemu = directory / "qemu"
    qemu.mkdir()
    ca = x509.load_pem_x509_certificate((directory / "server-cert.pem").read_bytes())
    ca_key = serialization.load_pem_private_key(
        (directory / "server-key.pem").read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench qemu-nbd")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (qemu / "server-cert.pem").write_bytes(pem)
    (qemu / "server-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    trust = (directory / "server-cert.pem").read_bytes()
    (qemu / "ca-cert.pem").write_bytes(trust)
    (directory / "ca-cert.pem").write_bytes(trust)
    (directory / ".pki" / "libnbd").mkdir(parents=True)  # libnbd's default, for fio
    (directory / ".pki" / "libnbd" / "ca-cert.pem").write_bytes(trust)
    return directory


def measure(root: Path, report: Report, cfg: Config, lab: Lab) -> None:
    from tandem.storage.pool import ChunkPool
    from tandem.storage.volume import capture_volume

    volume = root / "volume.raw"
    log("nbd: writing the 512 MiB volume, capturing it through an appliance and an agent")
    write_volume(volume, DataSource(cfg.seed))
    site = DaemonSite(lab, volume, root / "scratch")
    pool = ChunkPool.create(root / "pool")  # the TLS row's child serves from this one
    mid, _, _ = capture_volume(pool, volume)
    tls = make_tls_dir(root / "tls")
    settle()
    for w in WORKLOADS:
        creds = tls if w.tls else None
        tandem: TandemServer | DaemonExport
        if creds is None:
            tandem = DaemonExport(site)
        else:
            tandem = TandemServer(root / "pool", mid.hex(), root / "overlay", creds)
        try:
            ours = fio(tandem.uri, w, creds)
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
            peer_server = QemuNbd(volume, "raw", creds)
        try:
            peer = fio(peer_server.uri, w, creds)
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
    "NBD: a 512 MiB volume (random and text-like MiB in turn) captured by `tandem capture`; "
    "the appliance daemon serves a fresh virtual copy of it for each workload (`tandem mount "
    "IMAGE --action map-only`, the core test failover shares; the TLS row: the same copy "
    "served by a child process, Overlay + NbdServer), qemu-nbd serves the raw file for "
    "reads and a fresh qcow2 overlay over "
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
        with Lab(root / "lab") as lab:
            measure(root, report, cfg, lab)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def serve(pool_dir: str, manifest_hex: str, overlay_dir: str, tls_dir: str = "") -> None:
    """Serve a fresh virtual copy of an image until stdin closes (prints the URI first)."""
    from tandem.appliance.nbd import NbdServer, tls_context
    from tandem.storage.manifest import VolumeManifest, load_manifest
    from tandem.storage.overlay import Overlay
    from tandem.storage.pool import ChunkPool

    pool = ChunkPool(pool_dir)
    mid = bytes.fromhex(manifest_hex)
    manifest = load_manifest(pool, mid)
    assert isinstance(manifest, VolumeManifest)
    overlay = Overlay.create(Path(overlay_dir), pool, manifest, mid)
    tls = None
    if tls_dir:
        tls = tls_context(Path(tls_dir) / "server-cert.pem", Path(tls_dir) / "server-key.pem")
    with NbdServer("127.0.0.1", 0, tls=tls) as server:
        print(server.add_export("copy", overlay), flush=True)
        sys.stdin.read()
        server.remove_export("copy")
    overlay.delete()


if __name__ == "__main__":
    if len(sys.argv) in (5, 6) and sys.argv[1] == "serve":
        serve(*sys.argv[2:])
    else:
        usage = "serve POOL MANIFEST_HEX OVERLAY_DIR [TLS_DIR]"
        sys.exit(f"usage: {os.path.basename(sys.argv[0])} {usage}")
