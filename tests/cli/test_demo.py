"""`tandem demo`, its lab of daemons and its sample app, as an operator runs them."""

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

from tandem.cli import demo, sampleapp

TANDEM = [sys.executable, "-m", "tandem.cli"]
SAMPLEAPP = [sys.executable, "-m", "tandem.cli.sampleapp"]


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


def test_demo_runs_the_one_site_drill_and_reports_it(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run(
        [*TANDEM, "demo", "--json", "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout)  # exactly one document on stdout

    assert report["ok"] and report["failed_step"] is None and report["error"] is None
    steps = {s["name"]: s for s in report["steps"]}
    assert all(s["status"] == "succeeded" for s in report["steps"]), report["steps"]
    assert {
        "capture-full",
        "capture-incremental",
        "damage",
        "restore",
        "verify-data",
        "verify-images",
    } <= steps.keys()
    assert report["data_verified_equal"] is True
    assert (
        all(report["checks"].values()) and {"files_equal", "disk_equal"} <= report["checks"].keys()
    )

    full, incremental = report["captures"]["full"], report["captures"]["incremental"]
    for app in ("files", "disk"):
        assert full[app]["status"] == incremental[app]["status"] == "succeeded"
        assert 0 < incremental[app]["bytes_sent"] < full[app]["bytes_sent"], (app, report)
    assert incremental["disk"]["bytes_sent"] < full["disk"]["bytes_sent"] / 10

    restores = steps["restore"]["jobs"]
    assert [(j["type"], j["app"], j["status"]) for j in restores] == [
        ("restore", "files", "succeeded"),
        ("restore", "disk", "succeeded"),
    ]
    assert all(j["id"].startswith("job_") and j["seconds"] >= 0 for j in restores)
    assert report["bytes_sent"] > 0 and report["bytes_total"] >= report["bytes_sent"]
    assert set(report["images"]) == {"files-full", "disk-full", "files-incr", "disk-incr"}

    # Progress went to stderr; everything was stopped and removed afterwards.
    assert "capture (incremental)" in proc.stderr and "data equal" in proc.stderr
    assert not work.exists()
    assert processes_mentioning(str(work)) == []


def test_a_failing_step_fails_the_demo_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[str] = []

    def fine(ctx: demo.Context) -> str:
        ran.append("fine")
        ctx.lab.on_close("note the clean-up", lambda: ran.append("cleaned up"))
        return "all good"

    def broken(ctx: demo.Context) -> str:
        ran.append("broken")
        raise demo.StepFailed("production differs from image img_x: changed app.db")

    def after(ctx: demo.Context) -> str:
        ran.append("after")
        return "never"

    monkeypatch.setattr(
        demo,
        "STEPS",
        [
            demo.Step("fine", "a fine step", fine),
            demo.Step("broken", "a broken step", broken),
            demo.Step("after", "a later step", after),
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
    ) as proc:
        assert proc.stderr is not None
        seen = []
        # Once the third step starts, both daemons and the sample app are running.
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
        time.sleep(0.3)
        assert {"app.db", "app.db-wal", "log", "blobs", "assets"} <= {
            p.name for p in data.iterdir()
        }
        assert "held at row" in cli("hold", str(data))
        # Held: the database is closed (no -wal), and nothing changes any more.
        before = demo.tree_state(data), demo.volume_state(disk)
        assert "app.db-wal" not in before[0]
        time.sleep(0.3)
        assert (demo.tree_state(data), demo.volume_state(disk)) == before
        rows = sampleapp.read_status(paths)["rows"]
        cli("release", str(data))
        time.sleep(0.3)
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
