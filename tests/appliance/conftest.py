"""Appliance fixtures: a real appliance directory (SQLite, or PostgreSQL with
TANDEM_TEST_PG_URL) and an HTTPS client on its API, served in-process by uvicorn.

(Not Starlette's TestClient: with httpx rather than httpx2 it raises a deprecation warning,
which the test suite treats as an error.)"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tandem.appliance.daemon import Appliance, init
from tandem.domain.rules import Role
from tandem.operations import tokens
from tests.appliance.live import LiveServer, free_port
from tests.catalog.conftest import catalog_url

__all__ = ["catalog_url"]


@dataclass
class Booted:
    """An appliance made by ``init`` (not serving) and its admin token."""

    appliance: Appliance
    admin_token: str


@dataclass
class Api:
    """An appliance, a client on its API, and one token per role."""

    appliance: Appliance
    client: httpx.Client
    tokens: dict[str, str]

    def headers(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@pytest.fixture
def booted(tmp_path: Path, catalog_url: str) -> Iterator[Booted]:
    directory = tmp_path / "appliance"
    info = init(directory, "site-a", f"127.0.0.1:{free_port()}", catalog_url)
    appliance = Appliance(directory, workers=2)
    try:
        yield Booted(appliance, info["token"])
    finally:
        appliance.stop()


@pytest.fixture
def api(booted: Booted) -> Iterator[Api]:
    secrets = {"admin": booted.admin_token}
    for role in (Role.OPERATOR, Role.VIEWER):
        _, secrets[role.value] = tokens.add_token(booted.appliance.site, name=role.value, role=role)
    appliance = booted.appliance
    with (
        LiveServer(appliance.app, appliance.directory, appliance.config.port),
        httpx.Client(
            base_url=appliance.site.url, verify=pinned(appliance.directory), timeout=120.0
        ) as client,
    ):
        yield Api(appliance, client, secrets)


def pinned(directory: Path) -> ssl.SSLContext:
    """Trust exactly the daemon's own certificate."""
    context = ssl.create_default_context(cafile=str(directory / "cert.pem"))
    context.check_hostname = False
    return context


def seed_app(
    appliance: Appliance, name: str = "web", *, managed: bool = True, template: str = "daily"
) -> None:
    """A host (not contacted), an app on it and, if ``managed``, a template protecting it."""
    from tandem.catalog import queries as q
    from tandem.domain.lifecycle import AppKind, Operation

    with appliance.catalog.begin() as session:
        if not q.list_hosts(session):
            q.add_host(
                session, name="h1", url="https://127.0.0.1:1", token="t", fingerprint="00" * 32
            )
        q.add_app(session, name=name, kind=AppKind.FILESYSTEM, host="h1", path="/srv/" + name)
        if managed:
            if template not in {t.name for t in q.list_templates(session)}:
                q.add_template(session, name=template, every_seconds=86400)
            q.record_transition(session, app=name, operation=Operation.PROTECT, actor="test")
            q.set_app_template(session, name=name, template=template)


def seed_image(appliance: Appliance, app: str, source: Path) -> str:
    """Capture ``source`` straight into the appliance's pool and record a snapshot of ``app``."""
    from tandem.catalog import queries as q
    from tandem.domain.images import ImageKind
    from tandem.storage.tree import capture_tree

    mid, manifest, _ = capture_tree(appliance.site.pool, source)
    with appliance.catalog.begin() as session:
        image = q.add_image(
            session, app=app, kind=ImageKind.SNAPSHOT, manifest=mid.hex(), size=manifest.size
        )
    return image.id
