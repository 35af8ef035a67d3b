"""`tandem demo` (the two-site DR drill of ``tandem.drill``), its lab of daemons and its
sample app, as an operator runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import typer

from tandem.appliance.nbd import NbdServer
from tandem.cli import demo
from tandem.drill import report as drill_report
from tandem.drill import sampleapp, steps
from tandem.storage.overlay import Overlay
from tandem.storage.pool import ChunkPool
from tandem.storage.volume import capture_volume

TANDEM = [sys.executable, "-m", "tandem.cli"]
SAMPLEAPP = [sys.executable, "-m", "tandem.drill.sampleapp"]
MiB = 1024 * 1024


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the running processes that mention ``text`` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(cmdline)
    return found


def wait_until(predicate: Any, what: str, timeout: float = 60.0) -> None:
    """Poll for a state; the deadline only bounds a failure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


DRILL = [
    "start-sites",
    "pair",
    "start-app",
    "protect",
    "capture-full",
    "app-writes",
    "capture-incremental",
    "test-failover",
    "capture-during-test",
    "end-test",
    "test-volume",
    "disaster",
    "failover",
    "dr-runs",
    "syncback-catch-up",
    "stop-dr",
    "syncback-final",
    "restore",
    "verify-production",
    "failback",
    "mirror-resumes",
    "verify-images",
]


def test_demo_runs_the_two_site_drill_and_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run(
        [*TANDEM, "demo", "--json", "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout)  # exactly one document on stdout

    assert report["ok"] and report["failed_step"] is None and report["error"] is None
    assert [s["name"] for s in report["steps"]] == DRILL
    assert all(s["status"] == "succeeded" for s in report["steps"]), report["steps"]
    steps = {s["name"]: s for s in report["steps"]}
    jobs = [j for s in report["steps"] for j in s["jobs"]]
    assert jobs and all(j["status"] == "succeeded" and j["id"].startswith("job_") for j in jobs)
    assert all(j["seconds"] >= 0 and j["site"] in ("prod", "dr") for j in jobs)

    # Data verified equal at each site: the test copy and the failed-over copy at dr equal
    # their replicas; production after the restore equals the DR copy as it was stopped.
    assert report["data_verified_equal"] is True
    assert set(report["data_equal"]) == set(drill_report.COMPARISONS)
    assert all(report["data_equal"].values())
    assert all(report["checks"].values())

    # The DR measures are there and plausible.
    assert 0 < report["rpo_seconds"] < 120
    assert 0 < report["failover_seconds"] < 120
    assert 0 < report["failback_downtime_seconds"] < 120
    measures = report["measures"]
    assert measures["failback_downtime_reported_seconds"] > 0

    # Bytes moved: per step, and by kind of transfer.
    t = {k: sum(v.values()) for k, v in report["transfers"].items()}
    assert set(report["transfers"]["syncback-final"]) == {"files", "disk"}
    assert 0 < t["syncback-final"] < t["syncback-catch-up"]
    assert 0 < t["replication-incremental"] < t["replication-full"]
    assert 0 < t["replication-after-failback"] < t["replication-full"] / 4
    for app in ("files", "disk"):
        first = report["transfers"]["replication-full"][app]
        assert 0 < report["transfers"]["replication-after-failback"][app] < first, app
    assert report["bytes_moved"]["capture-full"] == sum(
        j["bytes_sent"] for j in steps["capture-full"]["jobs"]
    )
    assert report["bytes_sent"] == sum(report["bytes_moved"].values())

    # The lifecycle ran where it should, in order.
    def kinds(step: str) -> list[tuple[str, str, str]]:
        return [(j["site"], j["type"], j["app"]) for j in steps[step]["jobs"]]

    assert kinds("capture-full") == [
        ("prod", "capture", "files"),
        ("prod", "capture", "disk"),
        ("prod", "replicate", "files"),
        ("prod", "replicate", "disk"),
    ]
    assert kinds("test-failover") == [("dr", "test-failover", "files")]
    assert kinds("failover") == [("dr", "failover", "disk"), ("dr", "failover", "files")]
    assert kinds("syncback-final") == [("dr", "syncback", "files"), ("dr", "syncback", "disk")]
    assert kinds("restore") == [("prod", "restore", "disk"), ("prod", "restore", "files")]
    assert kinds("failback") == [("dr", "failback", "files"), ("dr", "failback", "disk")]
    restored = {j["image"] for j in steps["restore"]["jobs"]}
    assert restored == {report["images"]["files-final"], report["images"]["disk-final"]}

    # Progress went to stderr; everything was stopped and removed afterwards.
    assert "failover time" in proc.stderr and "downtime starts" in proc.stderr
    assert not work.exists()
    assert processes_mentioning(str(work)) == []

    # Without --json, the same report is a table of steps and jobs and the DR measures.
    drill_report.print_report(report)
    out = capsys.readouterr().out
    for text in ("failover to host2", "final syncback", "failback (snapshot style)"):
        assert text in out
    for text in ("RPO achieved", "failover time", "failback downtime", "data verified equal"):
        assert text in out
    assert "✗" not in out and f"all {len(DRILL)} steps succeeded" in out


VM_DRILL = [
    "start-guest",
    "protect-vm",
    "capture-vm",
    "test-failover-vm",
    "end-test-vm",
    "stop-guest",
]


@pytest.mark.slow
def test_demo_vm_boots_a_new_vm_at_dr_that_reads_what_production_wrote(
    libvirt_host: None, tmp_path: Path
) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run(
        [*TANDEM, "demo", "--vm", "--json", "--workdir", str(work), "--size-mib", "16"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout)
    assert report["ok"], report["error"]
    # The whole drill, then the guest's steps.
    assert [s["name"] for s in report["steps"]] == DRILL + VM_DRILL
    assert all(report["checks"].values())
    # The new VM booted at dr from the test copy and printed the md5 of its disk: the one
    # the production guest printed when it was captured.
    assert report["data_equal"]["dr_test_vm"] is True
    assert report["data_verified_equal"] is True
    steps = {s["name"]: s for s in report["steps"]}
    assert [(j["site"], j["type"], j["app"]) for j in steps["capture-vm"]["jobs"]] == [
        ("prod", "capture", "vm"),
        ("prod", "replicate", "vm"),
        ("prod", "capture", "vm"),
        ("prod", "replicate", "vm"),
    ]
    assert [(j["site"], j["type"]) for j in steps["test-failover-vm"]["jobs"]] == [
        ("dr", "test-failover")
    ]
    # The incremental capture read what the guest rewrote (1 MiB), not its disk.
    read = report["transfers"]["vm-capture"]
    assert 0 < read["incremental"] <= 2 * MiB < read["full"]
    # Nothing is left defined in libvirt.
    listed = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert work.name not in listed


def test_demo_vm_without_libvirt_says_what_to_install(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = subprocess.run(
        [*TANDEM, "demo", "--vm", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PATH": str(empty)},  # no virsh, no qemu: libvirt is absent
    )
    assert proc.returncode == 2
    assert "tandem demo --vm needs libvirt" in proc.stderr
    assert "install libvirt-daemon-system" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "demo").exists()  # nothing was started


def test_a_failing_step_fails_the_demo_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[str] = []

    def fine(ctx: steps.Context) -> str:
        ran.append("fine")
        ctx.lab.on_close("note the clean-up", lambda: ran.append("cleaned up"))
        return "all good"

    def broken(ctx: steps.Context) -> str:
        ran.append("broken")
        raise steps.StepFailed("production differs from image img_x: changed app.db")

    def after(ctx: steps.Context) -> str:
        ran.append("after")
        return "never"

    monkeypatch.setattr(
        steps,
        "STEPS",
        [
            steps.Step("fine", "a fine step", fine),
            steps.Step("broken", "a broken step", broken),
            steps.Step("after", "a later step", after),
        ],
    )
    work = tmp_path / "demo"
    with pytest.raises(typer.Exit) as exit_:
        demo.demo(keep=False, workdir=work, size_mib=8, write_seconds=0.2, json_=True)
    assert exit_.value.exit_code == 1
    assert ran == ["fine", "broken", "cleaned up"]
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["ok"] is False and report["failed_step"] == "broken"
    assert report["error"] == "a broken step: production differs from image img_x: changed app.db"
    assert [s["status"] for s in report["steps"]] == ["succeeded", "failed", "skipped"]
    assert err.strip().splitlines()[-1] == (
        "error: demo failed at a broken step: production differs from image img_x: changed app.db"
    )
    assert not work.exists()


def test_workdir_must_be_new_or_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "something").write_text("mine\n")
    with pytest.raises(typer.Exit) as exit_:
        demo.demo(keep=False, workdir=tmp_path, size_mib=8, write_seconds=0.2, json_=False)
    assert exit_.value.exit_code == 2
    assert "is not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "something").read_text() == "mine\n"


def _sigint_as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_demo_stops_everything_it_started(
    tmp_path: Path, sig: signal.Signals
) -> None:
    work = tmp_path / "demo"
    with subprocess.Popen(
        [*TANDEM, "demo", "--workdir", str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a shell starts a background job (`make test &`) with SIGINT
        # ignored, and the demo, like any program, keeps an ignored SIGINT ignored.
        preexec_fn=_sigint_as_from_a_terminal,
    ) as proc:
        assert proc.stderr is not None
        seen = []
        # Once the third step starts, the four daemons are running.
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(" 3. "):
                break
        else:
            raise AssertionError("".join(seen))
        assert len(processes_mentioning(str(work))) >= 3
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not work.exists()
    assert processes_mentioning(str(work)) == []


def test_sample_app_writes_holds_releases_and_stops(tmp_path: Path) -> None:
    data, disk = tmp_path / "data", tmp_path / "disk.img"
    disk.write_bytes(bytes(4 * 1024 * 1024))
    paths = sampleapp.Paths.of(data)

    def cli(*args: str) -> str:
        proc = subprocess.run(
            [*SAMPLEAPP, *args], capture_output=True, text=True, timeout=60, check=True
        )
        return proc.stdout

    try:
        assert "running" in cli("start", str(data), "--disk", str(disk), "--interval", "0.02")
        wait_until(lambda: sampleapp.read_status(paths)["ticks"] > 0, "the app to write")
        assert {"app.db", "app.db-wal", "log", "blobs", "assets"} <= {
            p.name for p in data.iterdir()
        }
        assert "held at row" in cli("hold", str(data))
        # Held: the database is closed (no -wal), and nothing changes any more ...
        before = steps.tree_state(data), steps.volume_state(disk)
        assert "app.db-wal" not in before[0]
        # ... though it goes on running: a new hold is acknowledged only from its loop.
        assert "held at row" in cli("hold", str(data))
        assert (steps.tree_state(data), steps.volume_state(disk)) == before
        rows = sampleapp.read_status(paths)["rows"]
        cli("release", str(data))
        wait_until(lambda: sampleapp.read_status(paths)["rows"] > rows, "the app to write again")
        status = json.loads(cli("status", str(data)))
        assert status["running"] and status["state"] == "running" and status["rows"] > rows
        assert status["check"] == "ok" and status["errors"] == 0 and status["records"] > 0
        assert "already" not in cli("start", str(data))  # idempotent: same pid
        assert sampleapp.running_pid(paths) == status["pid"]
    finally:
        assert cli("stop", str(data)).strip() in ("sample app stopped", "")
    assert sampleapp.running_pid(paths) is None
    assert cli("stop", str(data)).strip() == "sample app was not running"
    assert sampleapp.read_status(paths)["state"] == "stopped"
    assert processes_mentioning(str(data)) == []


def test_sample_app_writes_its_disk_through_nbd_and_follows_the_attachment(
    tmp_path: Path, pool: ChunkPool
) -> None:
    """``--disk-from`` names the disk anew each time the app opens its data: a file at one
    site, an appliance's NBD export of a virtual copy at the other."""
    local = tmp_path / "disk.img"
    local.write_bytes(bytes(4 * MiB))
    mid, manifest, _ = capture_volume(pool, local)
    overlay = Overlay.create(tmp_path / "overlay", pool, manifest, mid)
    data, attached = tmp_path / "data", tmp_path / "disk.attached"
    attached.write_text(f"{local}\n")
    paths = sampleapp.Paths.of(data)
    with NbdServer("127.0.0.1", 0) as server:
        uri = server.add_export("copy", overlay)
        try:
            sampleapp.start(paths, disk_from=attached, interval=0.02, lifetime=120)
            wait_until(lambda: sampleapp.read_status(paths)["records"] > 0, "a record on disk")
            first = sampleapp.hold(paths)
            assert first["disk"] == str(local) and first["records"] > 0
            written = local.read_bytes()
            assert b"sampleapp record" in written
            attached.write_text(f"{uri}\n")  # the volume is attached through NBD now
            assert sampleapp.release(paths)["disk"] == uri  # reopened: the new attachment
            wait_until(
                lambda: sampleapp.read_status(paths)["records"] > first["records"],
                "a record written through NBD",
            )
            held = sampleapp.hold(paths)
            assert held["disk"] == uri and held["errors"] == 0
            assert local.read_bytes() == written  # the file is left alone
            disk = sampleapp.NbdDisk(uri)
            try:
                assert disk.size == 4 * MiB
                through_nbd = disk.pread(disk.size, 0)
            finally:
                disk.close()
            # The export was captured empty: its records are the ones written through NBD.
            assert through_nbd.count(b"sampleapp record") > 0
            assert held["opened_rows"] == first["rows"]  # reopened where it was held
        finally:
            sampleapp.stop(paths)
            overlay.close()
    with pytest.raises(OSError):
        sampleapp.NbdDisk(uri)  # the server is gone
    assert processes_mentioning(str(data)) == []
