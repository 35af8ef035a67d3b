"""Shared parts of the benchmarks: configuration, result rows, peers, data, rendering.

A benchmark section appends ``Row`` objects to a ``Report``. A row holds display strings
(tandem's figure, the peer's figure measured in the same run, their ratio, the target from
the issue) and the raw numbers behind them for ``--json``. Nothing here judges pass or fail.

Generated data is deterministic: every byte comes from BLAKE3 in keyed XOF mode, keyed by
the run's seed and a label, so two runs with the same seed see the same bytes.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3
from rich.console import Console
from rich.table import Table

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000
RSS_SAMPLE_SECONDS = 0.01

REPO_ROOT = Path(__file__).resolve().parent.parent
PEER_MISSING = "peer not installed (apt-get install rsync restic)"
WARM_CACHE_NOTE = (
    "All figures are warm-cache: the data sits in the page cache for tandem and for the peer "
    "alike (dropping caches is not reliable here)."
)

Value = float | int | str | None

# Text-like low-entropy bytes: 16 symbols, so zstd-1 stores them at about half their size.
_LOW_ENTROPY = bytes((b" etaoinshrdlucm\n" * 16)[i] for i in range(256))


@dataclass(frozen=True)
class Config:
    size: int  # bytes in the generated volume
    files: int  # small files in the generated tree
    workdir: Path  # scratch directory of this run (removed afterwards)
    seed: int
    quick: bool = False  # --quick: smaller default sizes, for a short run
    profile: Path | None = None  # --profile DIR: py-spy records of the daemons (e2e)


@dataclass
class Row:
    section: str
    measure: str
    tandem: str
    peer: str
    ratio: str
    target: str
    values: dict[str, Value] = field(default_factory=dict)


@dataclass
class Report:
    machine: dict[str, str]
    config: dict[str, Value]
    context: list[str] = field(default_factory=list)  # printed above the table
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # printed below it
    seconds: float = 0.0

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def note(self, text: str) -> None:
        self.notes.append(text)


# --- log ------------------------------------------------------------------------------

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def log(message: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    _err.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}")


# --- formatting -----------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    if n >= 10 * MB:
        return f"{n / MB:,.0f} MB"
    if n >= MB:
        return f"{n / MB:.1f} MB"
    if n >= 1000:
        return f"{n / 1000:.0f} kB"
    return f"{n:.0f} B"


def fmt_size(n: float) -> str:
    """A data size in binary units, for describing inputs (2 GiB, 64 KiB)."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n:.0f} B"


def fmt_rate(n_bytes: float, seconds: float) -> str:
    return f"{n_bytes / seconds / MB:,.0f} MB/s" if seconds > 0 else "—"


def fmt_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    return f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def fmt_ratio(a: float | None, b: float | None, basis: str) -> str:
    """``a / b`` as "0.93× cat speed": tandem's figure in units of ``basis``."""
    if a is None or not b:
        return "—"
    r = a / b
    return f"{r:.1f}× {basis}" if r >= 10 else f"{r:.2f}× {basis}"


# --- machine --------------------------------------------------------------------------


def _meminfo_total() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * KiB
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(cmd: Sequence[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


def machine_info() -> dict[str, str]:
    rev = _version(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"])
    return {
        "cpus": str(os.cpu_count() or 0),
        "ram": f"{_meminfo_total() / GiB:.1f} GiB",
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tandem": rev,
        "rsync": _version(["rsync", "--version"]),
        "restic": _version(["restic", "version"]),
        "load_start": load_average(),
    }


def load_average() -> str:
    """1/5/15-minute load averages: this machine may be shared with other work."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- processes ------------------------------------------------------------------------


def have(program: str) -> bool:
    return shutil.which(program) is not None


@dataclass
class ProcResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # wall time, process start to exit
    max_rss: int  # peak resident set (VmHWM) of the process, bytes
    cpu_seconds: float = 0.0  # user + system time of the process and its reaped children

    def check(self, what: str) -> ProcResult:
        if self.returncode != 0:
            tail = self.stderr.strip().splitlines()[-3:]
            raise RuntimeError(f"{what} exited {self.returncode}: {' | '.join(tail)}")
        return self


_TICK = os.sysconf("SC_CLK_TCK")


def session_cpu_seconds(sid: int) -> float:
    """User + system CPU seconds of every live process of session ``sid`` (a daemon started
    with ``start_new_session``: its own process and any children), children it reaped
    included. Compare two readings around a step: the daemon's CPU for that step, which is
    far steadier than wall time on a shared machine."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                text = fh.read()
        except OSError:  # gone meanwhile
            continue
        rest = text[text.rindex(")") + 2 :].split()
        if int(rest[3]) == sid:  # fields 6, 14-17 of proc(5): session, u/s time, children's
            total += sum(int(x) for x in rest[11:15])
    return total / _TICK


def vm_hwm(pid: int | str = "self") -> int:
    """Peak resident set (VmHWM) of a live process, bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * KiB
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class _PeakSampler(threading.Thread):
    """Samples a child's VmHWM until told to stop.

    Not ``ru_maxrss`` from wait4: Linux folds the memory of the pre-exec (v)forked copy of
    this, the parent, process into the child's maxrss, so a small child of a big parent
    reports the parent's size. VmHWM belongs to the exec'd image alone, and Popen returns
    only after the exec.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, vm_hwm(self.pid))
            if self.done.wait(RSS_SAMPLE_SECONDS):
                return


def run_measured(
    cmd: Sequence[str],
    *,
    scratch: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: bool = True,
) -> ProcResult:
    """Run ``cmd`` to completion: its wall time, output, and peak RSS (sampled VmHWM).

    Output goes through files rather than pipes, so a chatty child cannot block and timing
    is not disturbed by our reading. ``stdout=False`` sends it to /dev/null.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    out_path, err_path = scratch / "proc.out", scratch / "proc.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd),
            stdout=out if stdout else subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, **env} if env else None,
            cwd=cwd,
        )
        sampler = _PeakSampler(proc.pid)
        sampler.start()
        cpu = 0.0
        try:
            # wait4, not wait: the child's own rusage (user + system, its children included)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            cpu = usage.ru_utime + usage.ru_stime
        finally:
            seconds = time.perf_counter() - t0
            sampler.done.set()
            sampler.join()
            if proc.returncode is None:
                proc.wait()
    result = ProcResult(
        returncode=proc.returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        seconds=seconds,
        max_rss=sampler.peak,
        cpu_seconds=cpu,
    )
    out_path.unlink()
    err_path.unlink()
    return result


_REPORT_HWM = """
import json as _j
with open("/proc/self/status") as _fh:
    _hwm = [int(x.split()[1]) * 1024 for x in _fh if x.startswith("VmHWM:")][0]
print(_j.dumps({"vm_hwm": _hwm}))
"""


def python_child(code: str, *args: str, scratch: Path) -> tuple[dict[str, Any], ProcResult]:
    """Run ``code`` in a fresh interpreter of this venv; it prints one JSON object last.

    The child's peak RSS is the larger of the sampled VmHWM and the child's own reading at
    its end.
    """
    code += _REPORT_HWM
    res = run_measured([sys.executable, "-c", code, *args], scratch=scratch, cwd=REPO_ROOT)
    res.check("python child")
    doc: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-2])
    own = json.loads(res.stdout.strip().splitlines()[-1])["vm_hwm"]
    res.max_rss = max(res.max_rss, int(own))  # exact, where sampling may miss the very end
    return doc, res


_LITERAL = re.compile(r"Literal data:\s*([\d,]+)")


def rsync_literal_bytes(stats_output: str) -> int:
    """The "Literal data:" figure of ``rsync --stats`` (bytes not found in the basis file)."""
    m = _LITERAL.search(stats_output)
    if m is None:
        raise RuntimeError("rsync --stats printed no 'Literal data:' line")
    return int(m.group(1).replace(",", ""))


def restic_summary(json_output: str) -> dict[str, Any]:
    """The summary message of ``restic backup --json``."""
    for line in reversed(json_output.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"summary"' in line:
            doc: dict[str, Any] = json.loads(line)
            return doc
    raise RuntimeError("restic backup --json printed no summary")


# --- files ----------------------------------------------------------------------------


def tree_size(path: Path) -> int:
    """Apparent size in bytes of every file under ``path``."""
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total


def file_digest(path: Path) -> bytes:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as fh:
        while block := fh.read(16 * MiB):
            h.update(block)
    return h.digest()


def settle() -> None:
    """Write back dirty pages so one measurement does not pay for the previous one's writes."""
    os.sync()


def drop_caches() -> bool:
    """Write back, then drop the page cache (root only), so that the next measurement reads
    from disk whatever the steps before it left in memory; False when not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


# --- deterministic data ---------------------------------------------------------------


class DataSource:
    """Deterministic bytes for a seed: ``random(label, i, n)`` and ``text(label, i, n)``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def _key(self, label: str) -> bytes:
        return blake3.blake3(f"tandem-bench:{self.seed}:{label}".encode()).digest()

    def random(self, label: str, index: int, n: int) -> bytes:
        """``n`` incompressible bytes."""
        h = blake3.blake3(index.to_bytes(8, "little"), key=self._key(label))
        return h.digest(length=n)

    def text(self, label: str, index: int, n: int) -> bytes:
        """``n`` low-entropy, text-like bytes (zstd-1 halves them)."""
        return self.random(label, index, n).translate(_LOW_ENTROPY)

    def rng_seed(self, label: str) -> int:
        return int.from_bytes(self._key(label)[:8], "little")


# --- rendering ------------------------------------------------------------------------


def render(report: Report, console: Console) -> None:
    m = report.machine
    console.print(
        f"[bold]tandem benchmarks[/bold] · {m['cpus']} CPUs ({m['cpu']}) · RAM {m['ram']} · "
        f"Linux {m['kernel']} · Python {m['python']} · tandem {m['tandem']}"
    )
    console.print(f"peers: {m['rsync']} · {m['restic']}")
    console.print(
        f"load average (1/5/15 min) at start {m['load_start']}, at end {m.get('load_end', '?')}"
        " (above 0 means other work shared the CPUs)"
    )
    cfg = ", ".join(f"{k}={v}" for k, v in report.config.items())
    console.print(f"config: {cfg}")
    console.print(WARM_CACHE_NOTE)
    for text in report.context:
        console.print(text)
    table = Table(show_lines=False, header_style="bold")
    table.add_column("measure", no_wrap=True)
    table.add_column("tandem", justify="right", no_wrap=True)
    table.add_column("peer, same run", justify="right")
    table.add_column("ratio (tandem ÷)", justify="right", no_wrap=True)
    table.add_column("target", no_wrap=True)
    section = None
    for row in report.rows:
        if row.section != section:
            if section is not None:
                table.add_section()
            table.add_row(f"[bold]{row.section}[/bold]", "", "", "", "")
            section = row.section
        table.add_row("  " + row.measure, row.tandem, row.peer, row.ratio, row.target)
    console.print(table)
    for text in report.notes:
        console.print(f"• {text}")
    console.print(f"run time {report.seconds:.0f} s")


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(asdict(report), indent=2) + "\n")


def make_console() -> Console:
    """Stdout console; wide enough for the table when stdout is not a terminal."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=170)
    return console
