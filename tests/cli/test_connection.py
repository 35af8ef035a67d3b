"""Where a command finds its appliance (CLI.md): ``--url/--token/--fingerprint`` after the
command name, or before it (the root options), or ``TANDEM_*``; a flag beats the environment
and a command's own flag beats the root's. ``--json`` works on either side."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tandem.drill.lab import Daemon, child_env, tandem_argv


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = Daemon.create("appliance", tmp_path_factory.mktemp("cli") / "appliance", "prod")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


def tandem(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tandem_argv(*args),
        env=child_env() | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def flags(d: Daemon, token: str | None = None) -> list[str]:
    return ["--url", d.url, "--token", token or d.token, "--fingerprint", d.fingerprint]


def test_the_appliance_may_be_named_before_or_after_the_command(appliance: Daemon) -> None:
    for argv in (
        ["templates", *flags(appliance), "--json"],
        [*flags(appliance), "--json", "templates"],
        [*flags(appliance), "templates", "--json"],
        ["--json", "templates", *flags(appliance)],
    ):
        done = tandem(*argv)
        assert done.returncode == 0, (argv, done.stderr)
        assert json.loads(done.stdout) == [], argv


def test_a_flag_beats_the_environment_and_the_commands_own_beats_the_roots(
    appliance: Daemon,
) -> None:
    wrong = {"TANDEM_URL": appliance.url, "TANDEM_TOKEN": "not-a-token"}
    wrong["TANDEM_FINGERPRINT"] = appliance.fingerprint
    refused = tandem("templates", "--json", **wrong)
    assert refused.returncode == 1 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert tandem("--token", appliance.token, "templates", "--json", **wrong).returncode == 0
    assert tandem("templates", "--token", appliance.token, "--json", **wrong).returncode == 0
    both = tandem(*flags(appliance, "not-a-token"), "templates", *flags(appliance), "--json")
    assert both.returncode == 0, both.stderr


def test_a_job_command_with_no_wait_prints_the_job_alone(appliance: Daemon) -> None:
    done = tandem(*flags(appliance), "gc", "--no-wait", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert set(doc) == {"job"} and doc["job"]["type"] == "gc", doc
