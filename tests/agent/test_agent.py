"""The host agent's API, served for real (HTTPS, in-process)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tandem.agent import app as agent_app
from tandem.transport.server import load_daemon_dir
from tests.appliance.live import LiveServer, free_port


@dataclass
class Agent:
    client: httpx.Client
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    directory = tmp_path / "agent"
    info = agent_app.init(directory, "h1", f"127.0.0.1:{free_port()}")
    cfg = load_daemon_dir(directory, "agent")
    context = ssl.create_default_context(cafile=str(directory / "cert.pem"))
    context.check_hostname = False
    with (
        LiveServer(agent_app.create_app(cfg, directory), directory, cfg.port),
        httpx.Client(base_url=info["url"], verify=context, timeout=30) as client,
    ):
        yield Agent(client, info["token"])


def test_init_refuses_a_bad_name_and_a_second_init(tmp_path: Path) -> None:
    from tandem.errors import InvalidInput

    with pytest.raises(InvalidInput, match="not a valid name"):
        agent_app.init(tmp_path / "a", "no/slash", "127.0.0.1:1")
    agent_app.init(tmp_path / "b", "b", "127.0.0.1:1")
    with pytest.raises(InvalidInput, match="already holds"):
        agent_app.init(tmp_path / "b", "b", "127.0.0.1:1")


def test_health_is_open_everything_else_needs_the_token(agent: Agent) -> None:
    assert agent.client.get("/health").json()["kind"] == "agent"
    missing = agent.client.get("/api/v1/info")
    assert missing.status_code == 401 and "No agent token" in missing.json()["message"]
    wrong = agent.client.get("/api/v1/info", headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 401 and "agent token is wrong" in wrong.json()["message"]
    assert agent.client.get("/api/v1/info", headers=agent.auth).json()["name"] == "h1"


def test_run_reports_status_and_output(agent: Agent, tmp_path: Path) -> None:
    ok = agent.client.post(
        "/api/v1/run", headers=agent.auth, json={"command": "echo hi; echo err >&2"}
    )
    assert ok.json() == {"returncode": 0, "stdout": "hi\n", "stderr": "err\n"}
    failed = agent.client.post("/api/v1/run", headers=agent.auth, json={"command": "exit 7"})
    assert failed.json()["returncode"] == 7
    slow = agent.client.post(
        "/api/v1/run", headers=agent.auth, json={"command": "sleep 5", "timeout": 0.2}
    )
    assert slow.status_code == 500 and "did not finish within" in slow.json()["message"]
    for body in ({"command": ""}, {"command": "x", "timeout": -1}, {"cmd": "x"}):
        bad = agent.client.post("/api/v1/run", headers=agent.auth, json=body)
        assert bad.status_code == 422, body


def test_a_capture_whose_appliance_is_gone_ends_with_an_error_event(
    agent: Agent, tmp_path: Path
) -> None:
    (tmp_path / "data").mkdir()
    url = f"https://127.0.0.1:{free_port()}"
    body = {
        "kind": "filesystem",
        "path": str(tmp_path / "data"),
        "appliance": {"url": url, "fingerprint": "ab" * 32, "token": "t", "session": "abcd"},
    }
    resp = agent.client.post("/api/v1/capture", headers=agent.auth, json=body)
    assert resp.status_code == 200
    events = [json.loads(line) for line in resp.text.splitlines()]
    assert events[-1]["event"] == "error" and events[-1]["error"] == "Unreachable"
    assert f"appliance {url} unreachable at {url}" in events[-1]["message"]


@pytest.mark.parametrize(
    "change",
    [{"kind": "vm"}, {"path": "relative"}, {"base": "xyz"}, {"extra": 1}],
)
def test_capture_requests_are_validated(agent: Agent, change: dict[str, object]) -> None:
    body = {
        "kind": "volume",
        "path": "/x",
        "appliance": {"url": "https://a", "fingerprint": "f", "token": "t", "session": "ab"},
        **change,
    }
    assert agent.client.post("/api/v1/capture", headers=agent.auth, json=body).status_code == 422


def test_a_start_command_that_leaves_a_daemon_does_not_hang() -> None:
    """The command's output goes to files: a background child keeping them open is fine."""
    import time

    from tandem.agent.actions import RunRequest, run_command

    t0 = time.monotonic()
    result = run_command(RunRequest(command="sleep 30 & echo started", timeout=20))
    assert result["returncode"] == 0 and result["stdout"].strip() == "started"
    assert time.monotonic() - t0 < 10
