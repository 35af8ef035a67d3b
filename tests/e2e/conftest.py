"""End-to-end harness: real daemons as subprocesses on free loopback ports, driven by the CLI.

The daemons, the ``tandem`` command and ``wait_for`` are the drill's (``tandem.drill``): each
``Daemon`` is created with ``tandem appliance|agent init`` and run with ``tandem … serve`` in
a process group of its own, its output in a log file that failures quote. Tests talk to the
daemons only through the ``tandem`` command (``Cli``), with ``--json``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tandem.drill.lab import Daemon, wait_for
from tandem.drill.operator import Cli, Result
from tandem.drill.steps import Site
from tandem.transport.server import free_port

__all__ = ["Cli", "Daemon", "Result", "Site", "free_port", "wait_for"]  # for the tests


def _daemons_in(value: object) -> list[Daemon]:
    """The daemons a fixture value holds (a ``Daemon``, a ``Drill``, a ``Site``)."""
    if isinstance(value, Daemon):
        return [value]
    fields = getattr(value, "__dataclass_fields__", {})
    return [d for name in fields if isinstance(d := getattr(value, name), Daemon)]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed end-to-end test quotes what its daemons logged, and each PostgreSQL WAL
    receiver's log: a wait that timed out says nothing of why the state never came."""
    report = yield
    if report.failed and call.when != "setup":
        funcargs = getattr(item, "funcargs", {})
        seen: set[Path] = set()
        for daemon in (d for v in funcargs.values() for d in _daemons_in(v)):
            if daemon.log_path in seen:
                continue
            seen.add(daemon.log_path)
            report.sections.append((f"log of {daemon.kind} {daemon.name}", daemon.log_tail()))
            for receiver in sorted(daemon.directory.glob("pg/*/receivewal.log")):
                tail = receiver.read_text(errors="replace")[-2000:].strip() or "(empty log)"
                report.sections.append((f"{receiver} of {daemon.name}", tail))
    return report


def appliance_cli(appliance: Daemon) -> Cli:
    return appliance.cli()


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


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("site")
    appliance = Daemon.create("appliance", root / "appliance", "prod")
    agent = Daemon.create("agent", root / "agent", "host1")
    try:
        appliance.start()
        agent.start()
        register_host(appliance.cli(), agent)
        yield Site("production", appliance, agent, root)
    finally:
        agent.stop()
        agent.release_copies()
        appliance.stop()


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
    prod = Daemon.create("appliance", root / "prod", "prod")
    dr = Daemon.create("appliance", root / "dr", "dr", *dr_init)
    prod_agent = Daemon.create("agent", root / "agent1", "host1")
    dr_agent = Daemon.create("agent", root / "agent2", "host2")
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
        for d in (prod_agent, dr_agent):
            d.release_copies()  # file-tree copies presented through FUSE outlive the agent


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
        timeout=120.0,
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
