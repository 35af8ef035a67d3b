"""End-to-end harness: real daemons as subprocesses on free loopback ports, driven by the CLI.

Each ``Daemon`` is created with ``tandem appliance|agent init`` and run with ``tandem …
serve`` in a process group of its own, its output in a log file that failures quote. Tests
talk to the daemons only through the ``tandem`` command (``Cli``), with ``--json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

TANDEM = Path(sys.executable).with_name("tandem")
CLI_TIMEOUT = 120.0
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tandem_command() -> list[str]:
    if TANDEM.exists():
        return [str(TANDEM)]
    return [sys.executable, "-c", "from tandem.cli.main import main; main()"]


def clean_env() -> dict[str, str]:
    """The environment without the caller's TANDEM_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}


@dataclass
class Result:
    code: int
    doc: Any
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        """The one-line error the CLI printed (stderr, stripped)."""
        return " ".join(self.stderr.split())


@dataclass
class Cli:
    """Runs `tandem` against one appliance (TANDEM_URL, TANDEM_TOKEN, TANDEM_FINGERPRINT)."""

    url: str
    token: str
    fingerprint: str
    log: list[str] = field(default_factory=list)

    def env(self, token: str | None = None) -> dict[str, str]:
        env = clean_env()
        env.update(
            TANDEM_URL=self.url,
            TANDEM_TOKEN=self.token if token is None else token,
            TANDEM_FINGERPRINT=self.fingerprint,
        )
        return env

    def run(
        self, *args: str, token: str | None = None, check: bool = True, json_: bool = True
    ) -> Result:
        argv = [*tandem_command(), *args, *(["--json"] if json_ else [])]
        proc = subprocess.run(
            argv,
            env=self.env(token),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        self.log.append(f"$ tandem {' '.join(args)} -> {proc.returncode}")
        doc = None
        if json_ and proc.stdout.strip():
            doc = json.loads(proc.stdout)  # exactly one JSON document, or this fails
        result = Result(proc.returncode, doc, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"`tandem {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return result

    def __call__(self, *args: str, **kwargs: Any) -> Any:
        """Run and return the JSON document (the command must succeed)."""
        return self.run(*args, **kwargs).doc


class Daemon:
    """One `tandem appliance|agent serve DIR` process, created with `init`."""

    def __init__(self, kind: str, directory: Path, name: str, *init_args: str) -> None:
        self.kind = kind
        self.directory = directory
        self.name = name
        self.port = free_port()
        argv = [
            *tandem_command(),
            kind,
            "init",
            str(directory),
            "--name",
            name,
            "--listen",
            f"127.0.0.1:{self.port}",
            *init_args,
            "--json",
        ]
        proc = subprocess.run(
            argv, env=clean_env(), capture_output=True, text=True, timeout=CLI_TIMEOUT, check=True
        )
        self.info: dict[str, str] = json.loads(proc.stdout)
        self.url = self.info["url"]
        self.token = self.info["token"]
        self.fingerprint = self.info["fingerprint"]
        self.log_path = directory.parent / f"{directory.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*tandem_command(), self.kind, "serve", str(self.directory)],
                env=clean_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.wait_healthy()

    def wait_healthy(self) -> None:
        context = ssl.create_default_context(cafile=str(self.directory / "cert.pem"))
        context.check_hostname = False
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} {self.name} exited at start:\n{self.log_text()}")
            try:
                with httpx.Client(verify=context, timeout=2.0) as client:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.kind} {self.name} not healthy:\n{self.log_text()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the daemon's process group and wait for it; returns its exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)  # a test may have paused it (SIGSTOP)
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait(timeout)

    def kill9(self) -> int:
        return self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return "(no log)"


def appliance_cli(appliance: Daemon) -> Cli:
    return Cli(appliance.url, appliance.token, appliance.fingerprint)


def register_host(cli: Cli, agent: Daemon, name: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = cli(
        "host",
        "add",
        name or agent.name,
        "--url",
        agent.url,
        "--token",
        agent.token,
        "--fingerprint",
        agent.fingerprint,
    )
    return doc


@dataclass
class Site:
    """A running appliance with one registered host (its agent)."""

    root: Path
    appliance: Daemon
    agent: Daemon
    cli: Cli

    @property
    def host(self) -> str:
        return self.agent.name


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("site")
    appliance = Daemon("appliance", root / "appliance", "prod")
    agent = Daemon("agent", root / "agent", "host1")
    try:
        appliance.start()
        agent.start()
        cli = appliance_cli(appliance)
        register_host(cli, agent)
        yield Site(root, appliance, agent, cli)
    finally:
        agent.stop()
        appliance.stop()


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Drill:
    root: Path
    prod: Daemon
    dr: Daemon
    prod_agent: Daemon
    dr_agent: Daemon
    a: Cli
    b: Cli


@contextlib.contextmanager
def running_drill(root: Path, *dr_init: str) -> Iterator[Drill]:
    """Two appliances (``dr_init``: extra ``appliance init`` options for the DR one), an
    agent at each site, paired, with a mirroring template; all stopped at the end."""
    prod = Daemon("appliance", root / "prod", "prod")
    dr = Daemon("appliance", root / "dr", "dr", *dr_init)
    prod_agent = Daemon("agent", root / "agent1", "host1")
    dr_agent = Daemon("agent", root / "agent2", "host2")
    daemons = [prod, dr, prod_agent, dr_agent]
    try:
        for d in daemons:
            d.start()
        a, b = appliance_cli(prod), appliance_cli(dr)
        register_host(a, prod_agent)
        register_host(b, dr_agent)
        a("peer", "add", "--url", dr.url, "--token", dr.token, "--fingerprint", dr.fingerprint)
        a("template", "add", "mirrored", "--mirror", "--keep", "4")
        yield Drill(root, prod, dr, prod_agent, dr_agent, a, b)
    finally:
        for d in reversed(daemons):
            d.stop()


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    with running_drill(tmp_path_factory.mktemp("drill")) as built:
        yield built


def protect_and_replicate(d: Drill, app: str, kind: str, path: Path) -> dict[str, Any]:
    d.a("app", "add", app, "--host", "host1", "--kind", kind, "--path", str(path))
    d.a("app", "protect", app, "--template", "mirrored")
    snap: dict[str, Any] = d.a("capture", app)["image"]
    wait_for(lambda: any(i["id"] == snap["id"] for i in d.b("images", app)), 60, "the replica")
    return snap


# --- holding a daemon at a known point ---------------------------------------------------
#
# A test that must catch a step in the act (a transfer half done, a call under way) pauses
# the party the step waits on with SIGSTOP, once the step is seen to be there, rather than
# hoping a sleep was long enough: a paused daemon answers nothing, so the step waits for it
# however fast or slow the machine is. ``Daemon.stop`` continues a paused daemon first.


def pause(*daemons: Daemon) -> None:
    for d in daemons:
        assert d.proc is not None, f"{d.name} is not running"
        os.killpg(d.proc.pid, signal.SIGSTOP)


def resume(*daemons: Daemon) -> None:
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            os.killpg(d.proc.pid, signal.SIGCONT)


def api(d: Daemon) -> httpx.Client:
    """A fast client on a daemon's API (polling through the CLI is too slow to catch a step
    in the act: each call starts a Python process)."""
    context = ssl.create_default_context(cafile=str(d.directory / "cert.pem"))
    context.check_hostname = False
    return httpx.Client(
        base_url=d.url,
        verify=context,
        headers={"Authorization": f"Bearer {d.token}"},
        timeout=10.0,
    )


def job_row(d: Daemon, job_id: str) -> dict[str, Any]:
    """The job as the daemon's API shows it."""
    with api(d) as client:
        answer: dict[str, Any] = client.get(f"/api/v1/jobs/{job_id}").json()
    return answer


TCP_ESTABLISHED = 0x01


@dataclass(frozen=True)
class _Tcp:
    local_port: int
    remote_port: int
    state: int
    unread: int  # bytes received and not yet read by the socket's owner
    inode: int


def _tcp_sockets() -> list[_Tcp]:
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            rows.append(
                _Tcp(
                    local_port=int(f[1].rsplit(":", 1)[1], 16),
                    remote_port=int(f[2].rsplit(":", 1)[1], 16),
                    state=int(f[3], 16),
                    unread=int(f[4].split(":")[1], 16),
                    inode=int(f[9]),
                )
            )
    return rows


def _socket_inodes(pid: int) -> set[int]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            found.add(int(target[len("socket:[") : -1]))
    return found


def calling(caller: Daemon, callee: Daemon) -> bool:
    """Whether ``caller`` has sent ``callee`` bytes that ``callee`` has not read: a request
    (or the TLS handshake that opens one) under way. With ``callee`` paused, this is the
    caller waiting in a call to it, seen in the kernel's socket table."""
    assert caller.proc is not None and callee.proc is not None
    mine = _socket_inodes(caller.proc.pid)
    sockets = _tcp_sockets()
    ports = {
        s.local_port
        for s in sockets
        if s.inode in mine and s.remote_port == callee.port and s.state == TCP_ESTABLISHED
    }
    return any(s.local_port == callee.port and s.remote_port in ports and s.unread for s in sockets)
