"""A lab of tandem daemons on loopback: create, run and always clean up child processes.

A ``Lab`` owns a directory and any number of daemons (appliances and host agents) in it.
Each daemon is created with ``tandem appliance|agent init DIR --listen 127.0.0.1:PORT`` on a
free port and run with ``tandem … serve DIR`` as a child process, its output in
``DIR.log``. ``start`` returns once every daemon answers ``/health`` with the certificate
``init`` pinned. The demo's two-site drill runs two appliances and two agents; it stops the
production site's daemons (a disaster) and starts them again later (``launch`` starts the
processes without waiting, so the demo can go on while they come up, then ``wait``).
A daemon's ``extra_env`` is added to its environment (the demo tells each agent where its host's
files are, since both "hosts" share this machine). ``install_script`` places a hook script in
an agent's ``scripts/`` folder, as the host's administrator would (``install_hook_script``).
A ``Daemon`` also stands alone (``Daemon.create`` then ``start``/``stop``/``kill9``), as the
end-to-end tests use it; ``wait_for`` polls for a state with a deadline.

Invariants
- Daemons run in sessions of their own (a Ctrl-C in the terminal reaches only the lab, which
  then stops them in order) and, on Linux, get SIGTERM if the lab's process dies, even by
  SIGKILL (``PR_SET_PDEATHSIG``).
- Leaving the ``with`` block — normally, by an exception, by Ctrl-C, or by SIGTERM (turned
  into ``KeyboardInterrupt`` while the lab is open) — runs the registered clean-ups (newest
  first), stops every daemon (SIGTERM, then SIGKILL after a grace period) and, unless
  ``keep``, removes what the lab created.
- Every pipe and file the lab opens is closed again; every child is waited for.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from tandem.errors import DaemonDirInvalid, LabDaemonFailed, TandemError, Unreachable
from tandem.transport.client import ApiClient, ApplianceClient
from tandem.transport.server import free_port

if TYPE_CHECKING:
    from .operator import Cli

Kind = Literal["appliance", "agent"]
T = TypeVar("T")

START_TIMEOUT = 30.0
STOP_GRACE = 10.0
INIT_TIMEOUT = 60.0
HEALTH_POLL = 0.05
LOG_TAIL = 2000
PR_SET_PDEATHSIG = 1


def tandem_argv(*args: str) -> list[str]:
    """The command line that runs ``tandem ARGS`` with this very interpreter."""
    return [sys.executable, "-m", "tandem.cli", *args]


def child_env() -> dict[str, str]:
    """The environment for daemons: the caller's, without its TANDEM_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        prctl = ctypes.CDLL(name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return preexec


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return text[-LOG_TAIL:].strip() or "(empty log)"


@dataclass
class Daemon:
    """One daemon of the lab: its directory, address, credentials and process."""

    kind: Kind
    name: str
    directory: Path
    port: int
    url: str = ""
    token: str = ""
    fingerprint: str = ""
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    """Added to the daemon's environment when it is served."""
    init_args: tuple[str, ...] = ()
    """More options for ``tandem KIND init`` (``--nbd-tls``…)."""
    info: dict[str, str] = field(default_factory=dict)
    """What ``init`` printed (``name``, ``url``, ``token``, ``fingerprint``, ``scripts``)."""

    @classmethod
    def create(cls, kind: Kind, directory: Path, name: str, *init_args: str) -> Daemon:
        """A daemon made now with ``tandem KIND init`` on a free port (not started)."""
        daemon = cls(kind, name, directory, free_port(), init_args=init_args)
        proc = subprocess.run(
            daemon.init_argv(),
            env=child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=INIT_TIMEOUT,
            check=False,
        )
        daemon.created(proc.returncode, proc.stdout, proc.stderr)
        return daemon

    def init_argv(self) -> list[str]:
        return tandem_argv(
            self.kind,
            "init",
            str(self.directory),
            "--name",
            self.name,
            "--listen",
            f"127.0.0.1:{self.port}",
            *self.init_args,
            "--json",
        )

    def created(self, code: int, out: bytes, err: bytes) -> None:
        """Take what ``init`` printed (its exit status and output)."""
        if code != 0:
            raise LabDaemonFailed(
                kind=self.kind,
                name=self.name,
                what=f"was not created (`tandem {self.kind} init` exited with status {code})",
                said=err.decode(errors="replace").strip(),
            )
        self.info = json.loads(out)
        self.url, self.token = self.info["url"], self.info["token"]
        self.fingerprint = self.info["fingerprint"]

    def serve(self, preexec: Callable[[], None] | None = None) -> None:
        """Run ``tandem KIND serve`` in a session of its own; returns at once."""
        if self.running:
            return
        if not self.url:
            raise TandemError(f"{self.kind} {self.name} was not created; call init first")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                tandem_argv(self.kind, "serve", str(self.directory)),
                env=child_env() | self.extra_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Serve and wait until it answers /health."""
        self.serve(_die_with_parent())
        wait_healthy(self, time.monotonic() + timeout)

    def send(self, sig: int) -> None:
        """Send ``sig`` to the daemon's process group (continued first: a test may have
        paused it with SIGSTOP)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_GRACE) -> int:
        """Signal the daemon and wait for it (SIGKILL after ``timeout``); its exit status."""
        self.send(sig)
        return self.reap(time.monotonic() + timeout)

    def reap(self, deadline: float) -> int:
        """Wait for the daemon to exit (SIGKILL at ``deadline``); its exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        try:
            return proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def release_copies(self) -> None:
        """An agent's file-tree copies presented through FUSE outlive it (by design); at the
        end of a lab, ``tandem agent release DIR`` takes them down."""
        if self.kind != "agent" or not self.directory.is_dir():
            return
        subprocess.run(
            tandem_argv("agent", "release", str(self.directory)),
            env=child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=INIT_TIMEOUT,
            check=False,
        )

    def kill9(self) -> int:
        """SIGKILL the daemon (a crash) and reap it; returns its status."""
        return self.stop(signal.SIGKILL)

    @property
    def log_path(self) -> Path:
        return self.directory.with_name(self.directory.name + ".log")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, token: str | None = None) -> ApiClient:
        """A client for this daemon with its admin token (close it when done)."""
        return ApiClient(
            self.url,
            self.token if token is None else token,
            self.fingerprint,
            what=self.kind,
            name=self.name,
        )

    def api(self) -> ApplianceClient:
        """A client for this appliance's API with its admin token (close it when done)."""
        return ApplianceClient(self.url, self.token, self.fingerprint, name=self.name)

    def cli(self) -> Cli:
        """The ``tandem`` command against this appliance, as an operator runs it."""
        from .operator import Cli  # it builds on this module

        return Cli(self.url, self.token, self.fingerprint)

    def env(self) -> dict[str, str]:
        """TANDEM_URL, TANDEM_TOKEN and TANDEM_FINGERPRINT for the CLI against this daemon."""
        return {
            "TANDEM_URL": self.url,
            "TANDEM_TOKEN": self.token,
            "TANDEM_FINGERPRINT": self.fingerprint,
        }

    def log_tail(self) -> str:
        return _tail(self.log_path)

    def install_script(self, name: str, text: str) -> Path:
        """Place the hook script ``name`` in this agent's ``scripts/`` folder (after init)."""
        if self.kind != "agent":
            raise TandemError(f"{self.kind} {self.name} runs no hooks; install scripts in agents")
        return install_hook_script(self.directory, name, text)


def install_hook_script(agent_dir: Path, name: str, text: str) -> Path:
    """Write ``text`` as the hook script ``agent_dir/scripts/name`` (mode 0755, owned by
    whoever runs this: root, or the agent's own user), replacing it whole if it exists."""
    folder = agent_dir / "scripts"
    path = folder / name
    tmp = folder / f".{name}.tmp"
    tmp.write_text(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


class Lab:
    """Daemons as child processes in one directory; use it as a context manager."""

    def __init__(
        self, root: Path | None = None, *, keep: bool = False, prefix: str = "tandem-lab-"
    ) -> None:
        if root is None:
            self.root = Path(tempfile.mkdtemp(prefix=prefix))
            self._created = True
        else:
            root = root.absolute()
            if root.exists() and (not root.is_dir() or any(root.iterdir())):
                raise DaemonDirInvalid(
                    directory=root,
                    problem="is not an empty directory",
                    fix="Give a new or empty directory",
                )
            self._created = not root.exists()
            root.mkdir(parents=True, exist_ok=True)
            self.root = root
        self.keep = keep
        self.daemons: dict[str, Daemon] = {}
        self._cleanups: list[tuple[str, Callable[[], object]]] = []
        self._old_sigterm: Any = None
        self._preexec = _die_with_parent()
        self.cleanup_errors: list[str] = []

    # --- context ----------------------------------------------------------------------

    def __enter__(self) -> Lab:
        if _in_main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None

    def on_close(self, what: str, callback: Callable[[], object]) -> None:
        """Run ``callback`` when the lab closes, before its daemons stop (newest first)."""
        self._cleanups.append((what, callback))

    def close(self) -> None:
        """Run the clean-ups, stop every daemon and, unless ``keep``, remove the directory.

        A Ctrl-C while closing does not leave children behind: the clean-ups go on, the
        daemons are killed without grace, and KeyboardInterrupt is raised at the end.
        """
        interrupted = False
        while self._cleanups:
            what, callback = self._cleanups.pop()
            try:
                callback()
            except KeyboardInterrupt:
                interrupted = True
                self.cleanup_errors.append(f"{what}: interrupted")
            except Exception as exc:
                self.cleanup_errors.append(f"{what}: {exc}")
        grace = STOP_GRACE
        for _ in range(3):
            try:
                self.stop(*self.daemons.values(), grace=grace)
                break
            except KeyboardInterrupt:
                # Asked again to hurry: no more grace, but never leave a child behind.
                interrupted, grace = True, 0.0
        for daemon in self.daemons.values():
            daemon.release_copies()
        if not self.keep:
            if self._created:
                shutil.rmtree(self.root, ignore_errors=True)
            else:
                for child in self.root.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
        if interrupted:
            raise KeyboardInterrupt

    # --- daemons ----------------------------------------------------------------------

    def add(self, kind: Kind, name: str, env: dict[str, str] | None = None) -> Daemon:
        """Declare a daemon (its directory is ROOT/NAME); ``init`` creates it."""
        if name in self.daemons:
            raise TandemError(f"the lab already has a daemon named {name!r}")
        daemon = Daemon(kind, name, self.root / name, free_port(), extra_env=dict(env or {}))
        self.daemons[name] = daemon
        return daemon

    def init(self, *daemons: Daemon) -> None:
        """Run ``tandem KIND init`` for each daemon, all at once."""
        self._init(daemons, serve=False)

    def start(self, *daemons: Daemon, timeout: float = START_TIMEOUT) -> None:
        """Run ``tandem KIND serve`` for each daemon and wait until all answer /health."""
        self.launch(*daemons)
        self.wait(*daemons, timeout=timeout)

    def launch(self, *daemons: Daemon) -> None:
        """Run ``tandem KIND serve`` for each daemon not running; returns at once."""
        for d in daemons:
            d.serve(self._preexec)

    def wait(self, *daemons: Daemon, timeout: float = START_TIMEOUT) -> None:
        """Wait until every daemon (launched) answers /health."""
        deadline = time.monotonic() + timeout
        for d in daemons:
            wait_healthy(d, deadline)

    def up(self, *daemons: Daemon, timeout: float = START_TIMEOUT) -> None:
        """Create the daemons not yet created and start them all; each ``serve`` starts as
        soon as its own ``init`` is done. Returns once every daemon answers /health."""
        self._init([d for d in daemons if not d.url], serve=True)
        self.start(*daemons, timeout=timeout)

    def _init(self, daemons: Iterable[Daemon], *, serve: bool) -> None:
        procs: dict[str, tuple[Daemon, subprocess.Popen[bytes]]] = {}
        try:
            for d in daemons:
                procs[d.name] = (
                    d,
                    subprocess.Popen(
                        d.init_argv(),
                        env=child_env(),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                    ),
                )
            deadline = time.monotonic() + INIT_TIMEOUT
            while procs:
                ended = [name for name, (_, proc) in procs.items() if proc.poll() is not None]
                if not ended:
                    if time.monotonic() > deadline:
                        raise TandemError(f"`tandem … init` took over {INIT_TIMEOUT:.0f} s")
                    time.sleep(HEALTH_POLL)
                    continue
                for name in ended:
                    d, proc = procs.pop(name)
                    out, err = proc.communicate()
                    d.created(proc.returncode, out, err)
                    if serve:
                        d.serve(self._preexec)
        finally:
            for _, proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()

    def stop(self, *daemons: Daemon, grace: float = STOP_GRACE) -> dict[str, int]:
        """SIGTERM the daemons, SIGKILL any still running after ``grace``; their statuses."""
        live = [d for d in daemons if d.proc is not None]
        for d in live:
            d.send(signal.SIGTERM)
        deadline = time.monotonic() + grace
        return {d.name: d.reap(deadline) for d in live}

    def kill(self, daemon: Daemon) -> int:
        """SIGKILL one daemon (a crash) and reap it; returns its status."""
        return daemon.kill9()

    def exited(self) -> list[Daemon]:
        """The daemons that were started and have exited since (crashed, or were killed)."""
        return [d for d in self.daemons.values() if d.proc is not None and not d.running]

    def __iter__(self) -> Iterator[Daemon]:
        return iter(self.daemons.values())


def wait_healthy(daemon: Daemon, deadline: float) -> None:
    """Wait until ``daemon`` answers /health over TLS with its pinned certificate."""
    while True:
        if daemon.proc is None or daemon.proc.poll() is not None:
            code = None if daemon.proc is None else daemon.proc.returncode
            raise LabDaemonFailed(
                kind=daemon.kind,
                name=daemon.name,
                what=f"exited at start (status {code})",
                said=f"its log {daemon.log_path} ends with: {daemon.log_tail()}",
            )
        try:
            with ApiClient(
                daemon.url,
                None,
                daemon.fingerprint,
                what=daemon.kind,
                name=daemon.name,
                timeout=2.0,
            ) as client:
                client.health()
            return
        except Unreachable:
            pass
        if time.monotonic() > deadline:
            raise LabDaemonFailed(
                kind=daemon.kind,
                name=daemon.name,
                what=f"did not answer at {daemon.url}/health in time",
                said=f"its log {daemon.log_path} ends with: {daemon.log_tail()}",
            )
        time.sleep(HEALTH_POLL)


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; the deadline
    only bounds a failure (the state is polled for, never slept for)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _sigterm_to_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
