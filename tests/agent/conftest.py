"""Agent fixtures: a host agent made by ``init`` and served for real (HTTPS, in-process)."""

from __future__ import annotations

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
    directory: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def scripts(self) -> Path:
        """The agent's hook scripts folder."""
        return self.directory / "scripts"


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
        yield Agent(client, info["token"], directory)
