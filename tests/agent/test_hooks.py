"""Hooks on the host: the agent runs only scripts of its own scripts/ folder, by name, with
the TANDEM_* environment, and refuses any script the host did not make safe."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tandem.agent import app as agent_app
from tandem.agent.hooks import check_script
from tandem.drill.lab import install_hook_script
from tandem.errors import HookRefused
from tests.agent.conftest import Agent
from tests.appliance.live import free_port

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")


def install(agent: Agent, name: str, body: str, mode: int = 0o755) -> Path:
    path = install_hook_script(agent.directory, name, "#!/bin/sh\n" + body)
    os.chmod(path, mode)
    return path


def run(agent: Agent, script: str, **body: Any) -> httpx.Response:
    return agent.client.post(
        "/api/v1/run", headers=agent.auth, json={"script": script, "env": {}, **body}
    )


def refusal(answer: httpx.Response) -> tuple[int, str, str]:
    doc = answer.json()
    return answer.status_code, doc["error"], doc["message"]


def test_init_makes_the_scripts_folder(tmp_path: Path) -> None:
    info = agent_app.init(tmp_path / "a", "a", f"127.0.0.1:{free_port()}")
    folder = Path(info["scripts"])
    assert folder == tmp_path / "a" / "scripts"
    st = folder.lstat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_uid == os.geteuid() and list(folder.iterdir()) == []


def test_a_hook_runs_by_name_with_the_tandem_environment(
    agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = tmp_path / "env.txt"
    install(agent, "pg-stop", f"env > {recorded}\necho done\necho oops >&2\nexit 3\n")
    monkeypatch.setenv("TANDEM_TOKEN", "the-agent-s-own")  # not the hook's to see
    env = {
        "TANDEM_APP": "web",
        "TANDEM_SITE": "dr",
        "TANDEM_OPERATION": "failover",
        "TANDEM_IMAGE": "img_aaaaaaaaaaaa",
        "TANDEM_APP_PATH": "/srv/dr copy",
        "TANDEM_NBD_URI": "nbd://127.0.0.1:10809/img-aaaaaaaaaaaa",
    }
    answer = run(agent, "pg-stop", env=env)
    assert answer.status_code == 200
    assert answer.json() == {"returncode": 3, "stdout": "done\n", "stderr": "oops\n"}
    lines = recorded.read_text().splitlines()
    assert {k: v for k, _, v in (x.partition("=") for x in lines) if k.startswith("TANDEM_")} == env
    assert "PATH" in {x.partition("=")[0] for x in lines}  # the host's own environment


@pytest.mark.parametrize("name", ["../escape", "sub/escape", "/bin/sh", "..", ".escape"])
def test_a_name_that_is_not_a_plain_file_name_is_refused(
    agent: Agent, tmp_path: Path, name: str
) -> None:
    marker = tmp_path / "ran"
    for where in (agent.directory / "escape", agent.scripts / ".escape"):
        where.write_text(f"#!/bin/sh\ntouch {marker}\n")
        where.chmod(0o755)
    status, code, message = refusal(run(agent, name))
    assert (status, code) == (422, "InvalidInput")
    assert f"script: script {name!r} is not a script name" in message
    assert "scripts/ folder" in message
    assert not marker.exists()


def test_the_agent_checks_the_name_itself_too(agent: Agent) -> None:
    (agent.directory / "escape").write_text("#!/bin/sh\n")
    (agent.directory / "escape").chmod(0o755)
    with pytest.raises(HookRefused, match="not a plain file name"):
        check_script(agent.scripts, "../escape")


def _outside(tmp_path: Path, marker: Path) -> Path:
    target = tmp_path / "outside.sh"
    target.write_text(f"#!/bin/sh\ntouch {marker}\n")
    target.chmod(0o755)
    return target


CASES = {
    "missing": "there is no such file in the folder",
    "not-executable": "it is not executable",
    "group-writable": "it is writable by group or others (mode 0775)",
    "other-writable": "it is writable by group or others (mode 0757)",
    "a-folder": "it is not a regular file",
    "symlink-outside": "it is a symbolic link",
    "symlink-inside": "it is a symbolic link",
    "folder-writable": "the scripts folder is writable by group or others",
    "folder-symlink": "the scripts folder is not a plain folder",
    "agent-folder-writable": "the agent's folder is writable by group or others (mode 0777)",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_script_the_host_did_not_make_safe_is_refused(
    agent: Agent, tmp_path: Path, case: str
) -> None:
    marker = tmp_path / "ran"
    body = f"touch {marker}\n"
    if case == "not-executable":
        install(agent, "hook", body, 0o644)
    elif case == "group-writable":
        install(agent, "hook", body, 0o775)
    elif case == "other-writable":
        install(agent, "hook", body, 0o757)
    elif case == "a-folder":
        (agent.scripts / "hook").mkdir()
    elif case == "symlink-outside":
        (agent.scripts / "hook").symlink_to(_outside(tmp_path, marker))
    elif case == "symlink-inside":
        install(agent, "real", body)
        (agent.scripts / "hook").symlink_to("real")
    elif case == "folder-writable":
        install(agent, "hook", body)
        agent.scripts.chmod(0o777)
    elif case == "agent-folder-writable":  # anyone could rename another folder to scripts/
        install(agent, "hook", body)
        agent.directory.chmod(0o777)
    elif case == "folder-symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o755)
        (elsewhere / "hook").write_text(f"#!/bin/sh\n{body}")
        (elsewhere / "hook").chmod(0o755)
        agent.scripts.rmdir()
        agent.scripts.symlink_to(elsewhere)
    status, code, message = refusal(run(agent, "hook"))
    assert (status, code) == (422, "HookRefused"), message
    assert CASES[case] in message
    assert "install it there (chown root, chmod 0755)" in message
    assert not marker.exists()


@as_root
def test_a_script_not_owned_by_root_is_refused(agent: Agent, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    os.chown(install(agent, "hook", f"touch {marker}\n"), NOBODY, NOBODY)
    status, code, message = refusal(run(agent, "hook"))
    assert (status, code) == (422, "HookRefused")
    assert f"it is owned by uid {NOBODY}, not by root" in message
    assert not marker.exists()


@as_root
def test_a_scripts_folder_not_owned_by_root_is_refused(agent: Agent, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    install(agent, "hook", f"touch {marker}\n")
    os.chown(agent.scripts, NOBODY, NOBODY)
    status, code, message = refusal(run(agent, "hook"))
    assert (status, code) == (422, "HookRefused")
    assert f"the scripts folder is owned by uid {NOBODY}" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "env",
    [
        {"LD_PRELOAD": "/tmp/evil.so"},
        {"PATH": "/tmp"},
        {"TANDEM_SITE": "moon"},
        {"TANDEM_APP": "a\x00b"},
    ],
)
def test_only_tandem_variables_reach_a_hook(
    agent: Agent, tmp_path: Path, env: dict[str, str]
) -> None:
    marker = tmp_path / "ran"
    install(agent, "hook", f"touch {marker}\n")
    status, code, message = refusal(run(agent, "hook", env=env))
    assert (status, code) == (422, "InvalidInput"), message
    assert not marker.exists()


def test_the_old_command_request_is_refused(agent: Agent, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    answer = agent.client.post(
        "/api/v1/run", headers=agent.auth, json={"command": f"touch {marker}"}
    )
    assert answer.status_code == 422 and not marker.exists()


def test_a_slow_hook_times_out_and_a_daemon_it_leaves_does_not_hang(agent: Agent) -> None:
    install(agent, "slow", "sleep 5\n")
    status, _, message = refusal(run(agent, "slow", timeout=0.2))
    assert status == 504 and "did not finish within 0.2 s" in message
    assert "did not finish within" in message and "must not wait for the app" in message
    # The output goes to files: a background child keeping them open is fine.
    install(agent, "daemonize", "sleep 30 &\necho started\n")
    t0 = time.monotonic()
    answer = run(agent, "daemonize", timeout=20).json()
    assert answer["returncode"] == 0 and answer["stdout"].strip() == "started"
    assert time.monotonic() - t0 < 10
