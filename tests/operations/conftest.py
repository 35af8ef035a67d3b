"""A live site in-process: an appliance (API, job runner) and a host agent, both served over
HTTPS by uvicorn in threads, the agent registered as host ``h1``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tandem.agent import app as agent_app
from tandem.agent import fusemount
from tandem.appliance.daemon import Appliance
from tandem.operations import hosts
from tandem.transport.server import load_daemon_dir
from tests.appliance.conftest import Booted, booted
from tests.appliance.live import LiveServer, free_port
from tests.catalog.conftest import catalog_url

__all__ = ["booted", "catalog_url"]


@dataclass
class Live:
    appliance: Appliance
    agent: dict[str, str]


@pytest.fixture
def live(booted: Booted, tmp_path: Path) -> Iterator[Live]:
    appliance = booted.appliance
    agent_dir = tmp_path / "agent"
    info = agent_app.init(agent_dir, "h1", f"127.0.0.1:{free_port()}")
    cfg = load_daemon_dir(agent_dir, "agent")
    with (
        LiveServer(appliance.app, appliance.directory, appliance.config.port),
        LiveServer(agent_app.create_app(cfg, agent_dir), agent_dir, cfg.port),
    ):
        hosts.add_host(
            appliance.site,
            name="h1",
            url=info["url"],
            token=info["token"],
            fingerprint=info["fingerprint"],
        )
        appliance.runner.start()
        try:
            yield Live(appliance, info)
        finally:
            appliance.runner.stop()
            fusemount.release_all(agent_dir)  # tree copies presented through FUSE outlive it
