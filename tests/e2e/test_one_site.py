"""One site end to end: a real appliance and real agents, driven only through the CLI."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tandem.drill.lab import install_hook_script
from tests.e2e.conftest import (
    Cli,
    Daemon,
    Site,
    appliance_cli,
    job_row,
    pause,
    register_host,
    resume,
    wait_for,
)

MiB = 1024 * 1024
CONFIRM = ["--confirm", "DATA LOSS", "--confirm", "OVERWRITE OTHER APPS"]


def tree_state(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its content (or its kind)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def make_tree(root: Path, files: int = 12, size: int = 512 * 1024) -> None:
    for i in range(files):
        sub = root / f"dir{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"file{i}.bin").write_bytes(os.urandom(size))
    (root / "notes.txt").write_text("hello\n")
    (root / "link").symlink_to("notes.txt")


def markers(site: Site, app: str, directory: Path) -> tuple[str, str]:
    """Stop/start hook scripts, installed in the agent's scripts/ folder, that append a line
    to ``directory``/events: the hook and its TANDEM_* environment. Returns their names."""
    events = shlex.quote(str(directory / "events"))
    for hook in ("stop", "start"):
        line = f"{hook} $TANDEM_APP $TANDEM_SITE $TANDEM_OPERATION $TANDEM_IMAGE $TANDEM_APP_PATH"
        install_hook_script(
            site.agent.directory, f"{app}-{hook}", f'#!/bin/sh\necho "{line}" >> {events}\n'
        )
    return f"{app}-stop", f"{app}-start"


def events(directory: Path) -> list[str]:
    path = directory / "events"
    return path.read_text().splitlines() if path.exists() else []


def add_app(cli: Cli, name: str, host: str, kind: str, path: Path, *extra: str) -> dict[str, Any]:
    doc: dict[str, Any] = cli(
        "app", "add", name, "--host", host, "--kind", kind, "--path", str(path), *extra
    )
    return doc


def test_filesystem_capture_incremental_restore(site: Site, tmp_path: Path) -> None:
    cli = site.cli
    data = tmp_path / "data"
    make_tree(data)
    assert site.agent.info["scripts"] == str(site.agent.directory / "scripts")  # agent init
    stop, start = markers(site, "files", tmp_path)
    app = add_app(cli, "files", site.host, "filesystem", data, "--start", start, "--stop", stop)
    assert app["state"] == "unmanaged"
    assert (app["start"], app["stop"]) == ("files-start", "files-stop")
    cli("template", "add", "manual")
    protected = cli("app", "protect", "files", "--template", "manual")
    assert (protected["state"], protected["template"]) == ("managed", "manual")
    listed = {a["name"]: a for a in cli("apps")}
    assert {k: listed["files"][k] for k in ("kind", "host", "state", "template")} == {
        "kind": "filesystem",
        "host": site.host,
        "state": "managed",
        "template": "manual",
    }

    first = cli("capture", "files")
    job, image = first["job"], first["image"]
    assert job["status"] == "succeeded", job
    assert job["type"] == "capture" and job["app"] == "files" and job["image"] == image["id"]
    assert image["kind"] == "snapshot" and image["app"] == "files"
    for key in ("id", "message", "bytes_total", "bytes_sent", "started", "finished"):
        assert key in job
    for key in ("id", "kind", "app", "created", "label"):
        assert key in image
    assert job["bytes_sent"] >= 12 * 512 * 1024  # random data: everything crossed once
    before = tree_state(data)

    # A small change: one file rewritten, one added, one removed.
    (data / "dir0" / "file0.bin").write_bytes(os.urandom(4096))
    (data / "new.txt").write_text("new\n")
    (data / "dir1" / "file1.bin").unlink()
    second = cli("capture", "files", "--label", "after change")
    assert second["job"]["status"] == "succeeded"
    assert second["image"]["label"] == "after change"
    assert second["job"]["bytes_sent"] < job["bytes_sent"] / 20, (job, second["job"])
    changed = tree_state(data)

    images = cli("images", "files")
    assert [i["id"] for i in images] == [second["image"]["id"], image["id"]]  # newest first

    # Without both typed confirmations the server refuses and nothing is touched.
    refused = cli.run("restore", "files", "--image", image["id"], check=False)
    assert refused.code == 1 and refused.doc is None
    assert '"DATA LOSS" and "OVERWRITE OTHER APPS"' in refused.error
    half = cli.run(
        "restore", "files", "--image", image["id"], "--confirm", "DATA LOSS", check=False
    )
    assert half.code == 1 and "OVERWRITE OTHER APPS" in half.error
    assert tree_state(data) == changed
    assert events(tmp_path) == []
    assert [j["type"] for j in cli("jobs", "--app", "files")] == ["capture", "capture"]

    restored = cli("restore", "files", "--image", image["id"], *CONFIRM)
    assert restored["job"]["status"] == "succeeded", restored["job"]
    assert restored["job"]["type"] == "restore" and restored["image"]["id"] == image["id"]
    assert tree_state(data) == before
    # each hook ran once, on production's copy, told what it acts on
    assert events(tmp_path) == [
        f"{hook} files production restore {image['id']} {data}" for hook in ("stop", "start")
    ]

    shown = cli("job", "show", restored["job"]["id"])
    assert shown["status"] == "succeeded" and shown["finished"] is not None
    jobs = cli("jobs", "--app", "files")
    assert [j["type"] for j in jobs] == ["restore", "capture", "capture"]
    assert all(j["status"] == "succeeded" for j in jobs)
    history = cli("app", "history", "files")
    assert [h["operation"] for h in history] == ["protect", "restore"]


def test_volume_capture_incremental_restore(site: Site, tmp_path: Path) -> None:
    cli = site.cli
    volume = tmp_path / "disk.img"
    with open(volume, "wb") as fh:
        fh.write(os.urandom(24 * MiB))
        fh.seek(40 * MiB)  # a hole: never read, never sent
        fh.write(os.urandom(8 * MiB))
    original = file_digest(volume)
    stop, start = markers(site, "disk", tmp_path)
    add_app(cli, "disk", site.host, "volume", volume, "--start", start, "--stop", stop)
    cli("template", "add", "manual-disk", "--keep", "5")
    cli("app", "protect", "disk", "--template", "manual-disk")

    first = cli("capture", "disk")
    assert first["job"]["status"] == "succeeded" and first["image"]["size"] == 48 * MiB
    assert 32 * MiB <= first["job"]["bytes_sent"] < 40 * MiB
    with open(volume, "r+b") as fh:
        fh.seek(10 * MiB + 12345)
        fh.write(os.urandom(MiB))
    changed = file_digest(volume)
    second = cli("capture", "disk")
    assert second["job"]["status"] == "succeeded"
    assert second["job"]["bytes_sent"] < first["job"]["bytes_sent"] / 4

    restored = cli("restore", "disk", "--image", first["image"]["id"], *CONFIRM)
    assert restored["job"]["status"] == "succeeded", restored["job"]
    assert file_digest(volume) == original
    assert [e.split()[0] for e in events(tmp_path)] == ["stop", "start"]

    # Untouched since that restore: the next one starts from it and reads nothing of the disk.
    again = cli("restore", "disk", "--image", second["image"]["id"], *CONFIRM)["job"]
    assert again["result"]["stats"]["bytes_compared"] == 0, again
    assert again["result"]["stats"]["bytes_written"] <= 2 * MiB
    assert file_digest(volume) == changed
    # Written since: the whole disk is compared again, and the result is still exact.
    with open(volume, "r+b") as fh:
        fh.seek(30 * MiB)
        fh.write(b"written behind tandem's back")
    full = cli("restore", "disk", "--image", first["image"]["id"], *CONFIRM)["job"]
    assert full["result"]["stats"]["bytes_compared"] > 0
    assert file_digest(volume) == original
    for image in cli("images", "disk"):
        assert cli("image", "verify", image["id"])["ok"]


def test_restore_refuses_a_running_app_until_it_has_a_stop_command(
    site: Site, tmp_path: Path
) -> None:
    cli = site.cli
    data = tmp_path / "busy"
    data.mkdir()
    (data / "db.sqlite").write_text("v1\n")
    add_app(cli, "busy", site.host, "filesystem", data)
    cli("template", "add", "busy-manual")
    cli("app", "protect", "busy", "--template", "busy-manual")
    image = cli("capture", "busy")["image"]
    (data / "db.sqlite").write_text("v2 written after the snapshot\n")
    # the application runs: it holds its database open
    holds = f"f = open({str(data / 'db.sqlite')!r}); print('up', flush=True); input()"
    with subprocess.Popen(
        [sys.executable, "-c", holds], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as app:
        try:
            assert app.stdout is not None and app.stdout.readline() == "up\n"
            refused = cli.run("restore", "busy", "--image", image["id"], *CONFIRM, check=False)
            assert refused.code == 1
            assert f"pid {app.pid}" in refused.error and "in use" in refused.error
            assert "tandem app set APP --stop" in refused.error
            assert (data / "db.sqlite").read_text() == "v2 written after the snapshot\n"

            # with a stop hook the restore stops it first, then writes
            install_hook_script(site.agent.directory, "busy-stop", f"#!/bin/sh\nkill {app.pid}\n")
            cli("app", "set", "busy", "--stop", "busy-stop")
            done = cli("restore", "busy", "--image", image["id"], *CONFIRM)
            assert done["job"]["status"] == "succeeded", done["job"]
            assert (data / "db.sqlite").read_text() == "v1\n"
            assert app.wait(10) != 0  # it was stopped by its stop hook
        finally:
            app.kill()


def test_bad_input_and_auth(site: Site, tmp_path: Path) -> None:
    cli = site.cli
    data = tmp_path / "data"
    make_tree(data, files=2, size=1024)
    add_app(cli, "guarded", site.host, "filesystem", data)

    wrong = cli.run("apps", token="not-a-token", check=False)
    assert wrong.code == 1 and wrong.doc is None
    assert "token is wrong" in wrong.error and "\n" not in wrong.stderr.strip()

    viewer = cli("token", "add", "watcher", "--role", "viewer")
    assert viewer["role"] == "viewer" and viewer["token"]
    assert "guarded" in {a["name"] for a in cli("apps", token=viewer["token"])}
    denied = cli.run("capture", "guarded", token=viewer["token"], check=False)
    assert denied.code == 1
    assert "Role 'viewer' may not POST /api/v1/apps/guarded/capture" in denied.error
    assert "operator role" in denied.error
    # A viewer's `image verify` cannot start the verify job; it is answered in the call.
    watched = tmp_path / "watched"
    make_tree(watched, files=2, size=1024)
    add_app(cli, "watched", site.host, "filesystem", watched)
    cli("template", "add", "by-hand")
    cli("app", "protect", "watched", "--template", "by-hand")
    image = cli("capture", "watched")["image"]
    checked = cli("image", "verify", image["id"], token=viewer["token"])
    assert checked["ok"] is True and checked["image"] == image["id"]
    assert [j["type"] for j in cli("jobs", "--app", "watched")] == ["capture"]
    operator = cli("token", "add", "ops", "--role", "operator")
    not_admin = cli.run(
        "token", "add", "x", "--role", "admin", token=operator["token"], check=False
    )
    assert not_admin.code == 1
    assert "Role 'operator' may not POST /api/v1/tokens" in not_admin.error
    # Hooks run as root on the host: an operator may not register them, an admin may.
    no_hooks = cli.run("app", "set", "guarded", "--stop", "x", token=operator["token"], check=False)
    assert no_hooks.code == 1 and no_hooks.doc is None
    assert "Role 'operator' may not register or change the hooks of application" in no_hooks.error
    assert "Use a token with the admin role" in no_hooks.error
    assert cli("app", "show", "guarded")["stop"] is None
    shell = cli.run("app", "set", "guarded", "--stop", "kill -9 1", check=False)
    assert shell.code == 2 and "is not a script name" in shell.error
    assert "scripts/ folder" in shell.error and "\n" not in shell.stderr.strip()
    assert cli("app", "set", "guarded", "--stop", "guarded-stop")["stop"] == "guarded-stop"
    assert cli("app", "show", "guarded")["stop"] == "guarded-stop"
    assert cli("app", "set", "guarded", "--stop", "")["stop"] is None

    unknown = cli.run("capture", "nosuch", check=False)
    assert unknown.code == 1 and "application 'nosuch' does not exist" in unknown.error
    no_image = cli.run("image", "show", "img_aaaaaaaaaaaa", check=False)
    assert no_image.code == 1 and "image 'img_aaaaaaaaaaaa' does not exist" in no_image.error
    no_host = cli.run(
        "app", "add", "x", "--host", "ghost", "--kind", "volume", "--path", "/x", check=False
    )
    assert no_host.code == 1 and "host 'ghost' does not exist" in no_host.error
    no_job = cli.run("job", "show", "job_aaaaaaaaaaaa", check=False)
    assert no_job.code == 1 and "job 'job_aaaaaaaaaaaa' does not exist" in no_job.error

    dup = cli.run(
        "app",
        "add",
        "guarded",
        "--host",
        site.host,
        "--kind",
        "filesystem",
        "--path",
        "/x",
        check=False,
    )
    assert dup.code == 1 and "application 'guarded' already exists" in dup.error
    dup_host = cli.run(
        "host",
        "add",
        site.host,
        "--url",
        site.agent.url,
        "--token",
        site.agent.token,
        "--fingerprint",
        site.agent.fingerprint,
        check=False,
    )
    assert dup_host.code == 1 and f"host '{site.host}' already exists" in dup_host.error

    unmanaged = cli.run("capture", "guarded", check=False)
    assert unmanaged.code == 1 and "is unmanaged; capture is not allowed" in unmanaged.error
    bad_every = cli.run("template", "add", "t", "--every", "5 fortnights", check=False)
    assert bad_every.code == 2 and "is not an interval" in bad_every.error
    relative = cli.run(
        "app", "add", "rel", "--host", site.host, "--kind", "volume", "--path", "x", check=False
    )
    assert relative.code == 2 and "path" in relative.error
    usage = cli.run("capture", check=False)
    assert usage.code == 2 and "Missing argument" in usage.error

    dead = Daemon.create("agent", tmp_path / "dead-agent", "ghost")  # initialised, never started
    unreachable = cli.run(
        "host",
        "add",
        "ghost",
        "--url",
        dead.url,
        "--token",
        dead.token,
        "--fingerprint",
        dead.fingerprint,
        check=False,
    )
    assert unreachable.code == 1
    assert f"host ghost unreachable at {dead.url}" in unreachable.error
    assert "ghost" not in {h["name"] for h in cli("hosts")}
    wrong_pin = cli.run(
        "host",
        "add",
        "pinned",
        "--url",
        site.agent.url,
        "--token",
        site.agent.token,
        "--fingerprint",
        "00" * 32,
        check=False,
    )
    assert wrong_pin.code == 1 and "not the pinned" in wrong_pin.error

    trail = cli("audit", "--limit", "200")
    assert any(
        row["status"] == 403 and row["actor"] == "watcher" and row["path"].endswith("/capture")
        for row in trail
    )
    assert any(
        row["status"] == 404 and row["path"] == "/api/v1/apps/nosuch/capture" for row in trail
    )
    assert all(row["method"] != "GET" for row in trail)


def test_scheduled_captures_and_retention(site: Site, tmp_path: Path) -> None:
    cli = site.cli
    data = tmp_path / "data"
    make_tree(data, files=3, size=64 * 1024)
    blob, scratch = data / "blob.bin", tmp_path / "blob.tmp"
    add_app(cli, "ticking", site.host, "filesystem", data)
    cli("template", "add", "every2s", "--every", "2s", "--keep", "2")
    cli("app", "protect", "ticking", "--template", "every2s")

    def scheduled() -> list[dict[str, Any]]:
        # New content between captures, so that pruned images leave garbage behind.
        scratch.write_bytes(os.urandom(300 * 1024))
        scratch.rename(blob)
        jobs = cli("jobs", "--app", "ticking", "--status", "succeeded")
        done = [j for j in jobs if j["actor"] == "scheduler" and j["type"] == "capture"]
        return done if len(done) >= 4 else []

    done = wait_for(scheduled, 40, "four scheduled captures")
    cli("app", "unprotect", "ticking")  # stops the schedule
    # --watch returns once none of the listed jobs is queued or running.
    watched = cli("jobs", "--app", "ticking", "--watch")
    assert watched and all(j["status"] in ("succeeded", "failed", "canceled") for j in watched)
    images = cli("images", "ticking")
    assert len(images) == 2, images  # --keep 2
    for image in images:
        assert image["kind"] == "snapshot"
        assert cli("image", "verify", image["id"])["ok"]
    pruned = [
        line["text"]
        for job in done
        for line in cli("job", "log", job["id"])
        if line["text"].startswith("retention (keep 2) removed")
    ]
    assert pruned, "no capture pruned an image"
    # Retention only marked: the space comes back with a collection, not inside a capture.
    assert cli("gc", "--status")["pending_deletions"] >= 2
    collected = cli("gc")["job"]
    assert collected["type"] == "gc" and collected["status"] == "succeeded"
    assert collected["result"]["chunks_removed"] > 0, collected
    assert cli("gc", "--status")["pending_deletions"] == 0
    first = cli("jobs", "--app", "ticking", "--limit", "2")
    then = cli("jobs", "--app", "ticking", "--limit", "2", "--after", first[-1]["id"])
    both = cli("jobs", "--app", "ticking", "--limit", "4")
    assert [j["id"] for j in first + then] == [j["id"] for j in both]
    bad = cli.run("gc", "--every", "5", check=False)
    assert bad.code != 0 and "every_seconds" in bad.error and "Traceback" not in bad.error
    assert cli("gc", "--every", "3600")["every_seconds"] == 3600
    for image in images:
        assert cli("image", "verify", image["id"])["ok"]
    gaps = sorted(j["created"] for j in done)
    assert len(set(gaps)) == len(gaps)


def test_agent_down_fails_the_job_and_keeps_images(site: Site, tmp_path: Path) -> None:
    cli = site.cli
    agent = Daemon.create("agent", tmp_path / "agent", "host2")
    agent.start()
    try:
        register_host(cli, agent)
        data = tmp_path / "data"
        make_tree(data, files=2, size=64 * 1024)
        add_app(cli, "fragile", agent.name, "filesystem", data)
        cli("template", "add", "manual-fragile")
        cli("app", "protect", "fragile", "--template", "manual-fragile")
        good = cli("capture", "fragile")["image"]
        agent.stop()

        failed = cli.run("capture", "fragile", check=False)
        assert failed.code == 1
        assert failed.doc["job"]["status"] == "failed"
        message = failed.doc["job"]["message"]
        assert f"host host2 unreachable at {agent.url}" in message
        assert f"host host2 unreachable at {agent.url}" in failed.error
        assert [i["id"] for i in cli("images", "fragile")] == [good["id"]]
        assert cli("image", "verify", good["id"])["ok"]

        agent.start()
        again = cli("capture", "fragile")
        assert again["job"]["status"] == "succeeded"
    finally:
        agent.stop()


@pytest.mark.slow
def test_kill9_during_capture_recovers(site: Site, tmp_path: Path) -> None:
    appliance = Daemon.create("appliance", tmp_path / "appliance", "prod2")
    appliance.start()
    try:
        cli = appliance_cli(appliance)
        register_host(cli, site.agent)
        volume = tmp_path / "big.img"
        with open(volume, "wb") as fh:
            for _ in range(300):
                fh.write(os.urandom(MiB))
        add_app(cli, "big", site.host, "volume", volume)
        cli("template", "add", "manual-big")
        cli("app", "protect", "big", "--template", "manual-big")

        job = cli("capture", "big", "--no-wait")["job"]
        assert job["status"] == "queued"

        def running() -> bool:
            shown = job_row(appliance, job["id"])
            assert shown["status"] in ("queued", "running"), f"ended before the kill: {shown}"
            return bool(shown["status"] == "running" and shown["bytes_done"] > 0)

        # Held in the act: once data flows, the agent that sends the rest is paused, so the
        # capture cannot finish before the kill however fast the machine is.
        wait_for(running, 30, "the capture to make progress", interval=0.01)
        pause(site.agent)
        try:
            held = job_row(appliance, job["id"])
            assert held["status"] == "running", f"ended before the agent was paused: {held}"
            appliance.kill9()
        finally:
            resume(site.agent)
        appliance.start()

        interrupted = cli("job", "show", job["id"])
        assert interrupted["status"] == "failed", interrupted
        assert interrupted["message"].startswith("interrupted")
        assert cli("images", "big") == []
        assert not [j for j in cli("jobs") if j["status"] in ("queued", "running")]

        after = cli("capture", "big")
        assert after["job"]["status"] == "succeeded", after["job"]
        with open(volume, "r+b") as fh2:
            fh2.seek(123 * MiB)
            fh2.write(os.urandom(MiB))
        incremental = cli("capture", "big")
        assert incremental["job"]["status"] == "succeeded"
        assert incremental["job"]["bytes_sent"] < 20 * MiB
        images = cli("images", "big")
        assert len(images) == 2
        for image in images:
            report = cli("image", "verify", image["id"])
            assert report["ok"] and report["bytes"] > 0, report
        pool = cli("storage", "verify", str(appliance.directory / "pool"))
        assert pool["ok"] and not pool["bad"] and not pool["missing"], pool
    finally:
        appliance.stop()


def test_paths_are_canonical_apps_do_not_overlap_and_restores_follow_no_symlink(
    site: Site, tmp_path: Path
) -> None:
    cli = site.cli
    data = tmp_path / "paths-app"
    make_tree(data, files=2, size=4096)
    for bad, fix in [
        ("/.", "is the root folder /"),
        ("//", "is the root folder /"),
        ("/etc/..", "is the root folder /"),
        ("A/../A", "is not an absolute path"),
        (f"{data}/", f"write it as '{data}'"),
        (f"{tmp_path}//paths-app", f"write it as '{data}'"),
        (f"{data}/../paths-app", f"write it as '{data}'"),
    ]:
        refused = cli.run(
            "app", "add", "p", "--host", site.host, "--kind", "filesystem", "--path", bad,
            check=False,
        )  # fmt: skip
        assert refused.code == 2 and refused.doc is None, bad
        assert fix in refused.error and "Traceback" not in refused.stderr, refused.stderr
    assert "p" not in {a["name"] for a in cli("apps")}

    add_app(cli, "paths", site.host, "filesystem", data)
    inside = cli.run(
        "app", "add", "p", "--host", site.host, "--kind", "filesystem",
        "--path", str(data / "dir0"), check=False,
    )  # fmt: skip
    assert inside.code == 1 and "lies inside the path of application 'paths'" in inside.error
    cli("template", "add", "paths-manual")
    cli("app", "protect", "paths", "--template", "paths-manual")
    image = cli("capture", "paths")["image"]

    # A clone never writes into a folder that is not empty.
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine").write_text("mine\n")
    clone = cli.run(
        "clone", image["id"], "--host", site.host, "--path", str(full), "--name", "pc",
        check=False,
    )  # fmt: skip
    assert clone.code == 1 and "never overwrites" in clone.error
    assert [p.name for p in full.iterdir()] == ["mine"]

    # Someone who can write beside the app's folder swaps it for a link to another folder:
    # the restore refuses, and the other folder keeps every file.
    victim = tmp_path / "victim"
    make_tree(victim, files=3, size=1000)
    before = tree_state(victim)
    data.rename(tmp_path / "paths-app.moved")
    data.symlink_to(victim)
    refused = cli.run("restore", "paths", "--image", image["id"], *CONFIRM, check=False)
    assert refused.code == 1
    assert f"a component of the path is a symbolic link ({data})" in refused.error
    assert tree_state(victim) == before and data.is_symlink()

    # Back to a real folder, the restore writes the image there.
    data.unlink()
    done = cli("restore", "paths", "--image", image["id"], *CONFIRM)
    assert done["job"]["status"] == "succeeded", done["job"]
    assert tree_state(data) == tree_state(tmp_path / "paths-app.moved")


def test_an_app_past_its_max_lag_is_shown_at_risk(site: Site, tmp_path: Path) -> None:
    cli = site.cli
    data = tmp_path / "data"
    make_tree(data, files=2, size=4096)
    add_app(cli, "laggard", site.host, "filesystem", data)
    bad = cli.run("template", "add", "broken", "--max-lag", "soon", check=False)
    assert bad.code != 0 and "--max-lag" in bad.error and "Traceback" not in bad.error
    assert "broken" not in {t["name"] for t in cli("templates")}
    relaxed = cli("template", "add", "relaxed", "--max-lag", "1d")
    assert (relaxed["max_lag"], relaxed["max_lag_seconds"]) == ("1d", 86400)
    cli("template", "add", "strict", "--max-lag", "1s")
    cli("app", "protect", "laggard", "--template", "relaxed")
    assert cli("capture", "laggard")["job"]["status"] == "succeeded"

    def laggard() -> dict[str, Any]:
        (row,) = [a for a in cli("apps") if a["name"] == "laggard"]
        return dict(row)

    row = laggard()
    assert (row["at_risk"], row["max_lag_seconds"]) == (False, 86400)
    assert row["rpo_seconds"] is not None and row["rpo_seconds"] < 86400
    table = cli.run("apps", json_=False).stdout
    (line,) = [x for x in table.splitlines() if "laggard" in x]
    assert "ok" in line and "AT RISK" not in line
    # Under a 1 s limit the same capture soon is too old.
    cli("app", "protect", "laggard", "--template", "strict")
    row = wait_for(lambda: (r := laggard())["at_risk"] and r, 30, "laggard at risk")
    assert row["rpo_seconds"] > 1
    table = cli.run("apps", json_=False).stdout
    (line,) = [x for x in table.splitlines() if "laggard" in x]
    assert "AT RISK" in line
    cli("app", "unprotect", "laggard")
