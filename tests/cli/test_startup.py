"""Every `tandem` call is a new process, so what a command imports is start-up time the
operator waits for (issues #14, #15). A command that talks to the appliance imports the
CLI, the wire contract and the HTTP client: never the data plane, the catalog, the jobs,
the daemons or the drill, nor what the HTTP stack would import for nothing (httpx's own
command-line client, trio). A behaviour guard on what is imported, not a timing test."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.drill.lab import Daemon, child_env

# Packages no command but the ones that use them may import (help lists every command).
HEAVY = (
    "tandem.storage",
    "tandem.catalog",
    "tandem.jobs",
    "tandem.operations",
    "tandem.appliance",
    "tandem.agent",
    "tandem.drill",
    "sqlalchemy",
    "fastapi",
    "uvicorn",
)
# What the HTTP stack would import for nothing a command does (help renders with pygments).
EXTRAS = ("trio", "httpx._main", "pygments")
# What only rendering for people needs: a script's call (JSON, an error, a job's progress on
# a stderr that is no terminal) prints without it.
RENDERING = ("rich",)

# Runs ``tandem ARGS`` in this interpreter the way the entry point does, then prints the
# modules it imported (the command's own output goes to stdout, this list to stderr's last
# line).
RUN = """
import json, sys
sys.argv = ["tandem", *json.loads(sys.argv[1])]
from tandem.cli.main import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def imported(*args: str) -> tuple[int, list[str]]:
    """The exit status of ``tandem ARGS`` and the modules it imported."""
    done = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(args)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = done.stderr.strip().splitlines()
    assert lines, done
    doc = json.loads(lines[-1])
    return doc["code"], doc["modules"]


def heavy_in(modules: list[str], heavy: tuple[str, ...] = HEAVY) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(f"{h}.") for h in heavy)]


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = Daemon.create("appliance", tmp_path_factory.mktemp("start") / "appliance", "prod")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


def test_listing_every_command_imports_no_data_plane_nor_drill() -> None:
    # --help builds every command (storage, demo, the daemons' groups included).
    code, modules = imported("--help")
    assert code in (0, None)
    assert "tandem.cli.storage" in modules and "tandem.cli.demo" in modules
    assert heavy_in(modules) == []


def test_an_api_command_imports_only_the_cli_and_its_client(appliance: Daemon) -> None:
    conn = ["--url", appliance.url, "--token", appliance.token]
    for args in (
        ["apps", *conn, "--fingerprint", appliance.fingerprint],
        ["jobs", *conn, "--fingerprint", appliance.fingerprint, "--json"],
        ["capture", "no-such-app", *conn, "--fingerprint", appliance.fingerprint],
    ):
        code, modules = imported(*args)
        assert code == (1 if args[0] == "capture" else 0), args
        assert "httpcore" in modules, args  # it did talk to the appliance
        assert heavy_in(modules, HEAVY + EXTRAS) == [], args


def test_a_script_s_call_prints_without_the_rendering_library(appliance: Daemon) -> None:
    """JSON, a job followed to its end and an error line need no Rich; a table for people
    still renders with it (imported when it is drawn)."""
    conn = ["--url", appliance.url, "--token", appliance.token, "--fingerprint"]
    fp = appliance.fingerprint
    for expected, args in (
        (0, ["apps", "--json", *conn, fp]),
        (0, ["jobs", "--json", *conn, fp]),
        # A job command followed to its end: its progress bar is on a stderr that is no
        # terminal here, where it would show nothing.
        (0, ["gc", "--json", *conn, fp]),
        (1, ["capture", "no-such-app", "--json", *conn, fp]),
        (1, ["apps", "--json", *conn, "00" * 32]),  # refused: not the pinned certificate
    ):
        code, modules = imported(*args)
        assert code == expected, args
        assert heavy_in(modules, HEAVY + EXTRAS + RENDERING) == [], args
    code, modules = imported("apps", *conn, appliance.fingerprint)
    assert code in (0, None) and "rich.table" in modules


def test_a_storage_command_still_finds_the_storage_engine(tmp_path: Path) -> None:
    code, modules = imported("storage", "init", str(tmp_path), "--json")
    assert code in (0, None)
    assert "tandem.storage.pool" in modules
