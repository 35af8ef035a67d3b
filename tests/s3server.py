"""A real S3-compatible object store for the tests: OpenStack Swift with its ``s3api``
middleware, from Debian's ``swift-proxy swift-account swift-container swift-object`` and
``memcached`` (tempauth keeps its tokens there).

``swift_s3()`` builds one-replica rings on a directory under a temp folder, starts the
account, container and object servers, memcached and the proxy as real processes on free
ports, waits until an S3 request signed with the test credentials is answered, yields an
``S3Server`` (endpoint, access key, secret) and stops every process it started. Nothing is
mocked: the pool's client talks SigV4 over HTTP to the proxy, which stores the objects in
files through the object server.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tandem.transport.server import free_port

PACKAGES = "swift-proxy swift-account swift-container swift-object memcached"
SWIFT_PYTHON = "/usr/bin/python3"  # Debian's swift lives in the system interpreter


@dataclass(frozen=True)
class S3Server:
    """Where the store answers and the tempauth user (``account:user``, key) that signs."""

    endpoint: str
    access_key: str
    secret_key: str
    folder: Path
    pids: dict[str, int] = field(default_factory=dict)  # server kind -> its process id

    @contextmanager
    def paused(self, kind: str) -> Iterator[None]:
        """Hold one server still (SIGSTOP) inside the block: the proxy answers 503 for what
        needs it once its ``node_timeout`` passes. Continued (SIGCONT) at the end."""
        os.kill(self.pids[kind], signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.pids[kind], signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of every server's log, for a failure message."""
        parts = []
        for log in sorted(self.folder.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)


def available() -> str | None:
    """None when Swift and memcached are installed, else what to install."""
    needed = [
        "/usr/bin/swift-proxy-server",
        "/usr/bin/swift-account-server",
        "/usr/bin/swift-container-server",
        "/usr/bin/swift-object-server",
        "/usr/bin/swift-ring-builder",
        "/usr/bin/memcached",
    ]
    if all(Path(p).exists() for p in needed):
        return None
    return f"install {PACKAGES} (apt-get) for the S3 object-store tests"


_SWIFT_CONF = """\
[swift-hash]
swift_hash_path_suffix = {suffix}
swift_hash_path_prefix = {prefix}

[storage-policy:0]
name = Policy-0
default = yes
"""

_BACKEND_CONF = """\
[DEFAULT]
devices = {devices}
mount_check = false
bind_timeout = 3
disable_fallocate = true
# the test's objects are small: a shared disk over 99% full (Swift's default reserve is 1%)
# must not turn every write into 507 Insufficient Storage
fallocate_reserve = 0
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
user = {user}
swift_dir = {swift_dir}
log_facility = LOG_LOCAL2
log_level = WARNING

[pipeline:main]
pipeline = healthcheck {kind}-server

[filter:healthcheck]
use = egg:swift#healthcheck

[app:{kind}-server]
use = egg:swift#{kind}

[{kind}-replicator]
[{kind}-auditor]
[{kind}-updater]
"""

_PROXY_CONF = """\
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
bind_timeout = 3
workers = 0
user = {user}
swift_dir = {swift_dir}
log_level = WARNING

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats
    s3api tempauth copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
# a paused backend (S3Server.paused) is a 503 within seconds, not the default 10 s
node_timeout = 2
conn_timeout = 0.5
recoverable_node_timeout = 2
# One node of each kind: never error-limit it. After ten errors (a paused backend's
# timeouts) the proxy would refuse it for a minute, failing the tests that come next.
error_suppression_limit = 1000000
error_suppression_interval = 1

[filter:s3api]
use = egg:swift#s3api
location = us-east-1

[filter:tempauth]
use = egg:swift#tempauth
user_tandem_tester = {secret} .admin

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:{memcached}

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo
"""


def _run(argv: list[str], cwd: Path) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    # swift-ring-builder exits 1 for warnings ("rebalance" of a one-device ring)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stdout}{done.stderr}")


def _build_rings(swift_dir: Path, ports: dict[str, int]) -> None:
    for kind in ("account", "container", "object"):
        builder = str(swift_dir / f"{kind}.builder")
        _run(["/usr/bin/swift-ring-builder", builder, "create", "10", "1", "1"], swift_dir)
        _run(
            [
                "/usr/bin/swift-ring-builder",
                builder,
                "add",
                f"r1z1-127.0.0.1:{ports[kind]}/sdb1",
                "1",
            ],
            swift_dir,
        )
        _run(["/usr/bin/swift-ring-builder", builder, "rebalance"], swift_dir)
        if not (swift_dir / f"{kind}.ring.gz").exists():
            raise RuntimeError(f"swift-ring-builder wrote no {kind}.ring.gz in {swift_dir}")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class _PortTaken(RuntimeError):
    """Another process bound one of the picked ports between the pick and the bind."""


@contextmanager
def swift_s3(folder: Path, *, timeout: float = 60.0) -> Iterator[S3Server]:
    """Start Swift + s3api under ``folder`` and yield where it answers; stop it after.
    Ports are picked before the servers bind them, so another process may take one in
    between: then the servers are stopped and started again on new ports (a few times)."""
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        procs: list[subprocess.Popen[bytes]] = []
        try:
            try:
                server = _start(folder / f"run{attempt}", procs, timeout)
            except _PortTaken:
                if attempt == PORT_ATTEMPTS:
                    raise
                continue
            yield server
            return
        finally:
            _stop(procs)


PORT_ATTEMPTS = 3


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        with suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(folder: Path, procs: list[subprocess.Popen[bytes]], timeout: float) -> S3Server:
    """Configure and start every process in ``folder`` (appended to ``procs`` as they
    start, for the caller to stop); returns once all of them answer."""
    folder.mkdir(parents=True, exist_ok=True)
    swift_dir = folder / "etc"
    devices = folder / "srv"
    (devices / "sdb1").mkdir(parents=True, exist_ok=True)
    swift_dir.mkdir(exist_ok=True)
    user = "root"
    ports = {k: free_port() for k in ("account", "container", "object", "proxy", "memcached")}
    if len(set(ports.values())) < len(ports):
        raise _PortTaken("the same port was picked twice")
    secret = secrets.token_hex(16)
    (swift_dir / "swift.conf").write_text(
        _SWIFT_CONF.format(suffix=secrets.token_hex(8), prefix=secrets.token_hex(8))
    )
    for kind in ("account", "container", "object"):
        (swift_dir / f"{kind}-server.conf").write_text(
            _BACKEND_CONF.format(
                devices=devices, port=ports[kind], user=user, swift_dir=swift_dir, kind=kind
            )
        )
    (swift_dir / "proxy-server.conf").write_text(
        _PROXY_CONF.format(
            port=ports["proxy"],
            user=user,
            swift_dir=swift_dir,
            secret=secret,
            memcached=ports["memcached"],
        )
    )
    _build_rings(swift_dir, ports)
    server = S3Server(
        endpoint=f"http://127.0.0.1:{ports['proxy']}",
        access_key="tandem:tester",
        secret_key=secret,
        folder=folder,
    )

    def start(name: str, argv: list[str]) -> None:
        log = (folder / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
        procs.append(proc)
        server.pids[name] = proc.pid
        log.close()

    memcached = ["/usr/bin/memcached", "-l", "127.0.0.1", "-p", str(ports["memcached"])]
    start("memcached", [*memcached, "-U", "0", "-u", "root", "-m", "16"])
    for kind in ("account", "container", "object", "proxy"):
        conf = swift_dir / f"{kind}-server.conf"
        start(kind, [SWIFT_PYTHON, f"/usr/bin/swift-{kind}-server", str(conf), "-v"])
    deadline = time.monotonic() + timeout
    checks = [
        f"http://127.0.0.1:{ports[k]}/healthcheck"
        for k in ("account", "container", "object", "proxy")
    ]
    while not all(_answers(url) for url in checks):
        for proc in procs:
            if proc.poll() is not None:
                logs = server.log_tail()
                if "already in use" in logs or "Could not bind" in logs:
                    raise _PortTaken(logs)
                raise RuntimeError(f"a Swift process exited ({proc.args!r}):\n{logs}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Swift did not answer in {timeout:.0f} s:\n{server.log_tail()}")
        time.sleep(0.1)  # polling the servers' health, with the deadline above
    return server


def wipe(folder: Path) -> None:
    """Remove a stopped server's folder (its objects and rings)."""
    shutil.rmtree(folder, ignore_errors=True)
