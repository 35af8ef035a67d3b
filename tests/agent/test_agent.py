"""The host agent's API, served for real (HTTPS, in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.agent import app as agent_app
from tests.agent.conftest import Agent
from tests.appliance.live import free_port


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
    [
        {"kind": "container"},
        {"path": "relative"},
        {"kind": "vm"},  # a vm's path is a domain name, not /x
        {"base": "xyz"},
        {"extra": 1},
        {"consistency": "now"},
    ],
)
def test_capture_requests_are_validated(agent: Agent, change: dict[str, object]) -> None:
    body = {
        "kind": "volume",
        "path": "/x",
        "appliance": {"url": "https://a", "fingerprint": "f", "token": "t", "session": "ab"},
        **change,
    }
    assert agent.client.post("/api/v1/capture", headers=agent.auth, json=body).status_code == 422


def test_dropping_kept_copies_needs_the_token_and_a_clean_full_path(
    agent: Agent, tmp_path: Path
) -> None:
    """``/api/v1/kept/drop`` removes folders on the host: only for the appliance's token,
    only for a full path without '..', and only the copies kept beside that tree."""
    from tandem.agent import pit

    data = tmp_path / "data"
    data.mkdir()
    kept = tmp_path / f"{pit._keep_stem(str(data))}0001"
    kept.mkdir()
    (kept / "f").write_text("a kept copy")
    other = tmp_path / "other"
    other.mkdir()
    url = "/api/v1/kept/drop"
    assert agent.client.post(url, json={"path": str(data)}).status_code == 401
    for bad in ("data", f"{tmp_path}/other/../data", "/", ""):
        resp = agent.client.post(url, headers=agent.auth, json={"path": bad})
        assert 400 <= resp.status_code < 500, (bad, resp.status_code)
        assert resp.json()["message"], bad
    resp = agent.client.post(url, headers=agent.auth, json={"path": str(data), "more": 1})
    assert resp.status_code == 422
    assert (kept / "f").exists() and other.exists()
    assert agent.client.post(url, headers=agent.auth, json={"path": str(data)}).status_code == 200
    assert not kept.exists() and data.exists() and other.exists()
