"""Capabilities are not data: an NBD export's URI (its secret lets whoever holds it read and
write the presented copy) is never shown to viewers, in the API or the console; operators
see it in the result of the job they started and on an audited request."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tandem.catalog import queries as q
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.jobs import JobStatus
from tandem.domain.rules import Role
from tandem.jobs.queue import submit_job
from tandem.operations import tokens
from tandem.transport.server import load_daemon_dir
from tests import vmguest
from tests.agent.conftest import Agent, agent
from tests.agent.test_vm import define_body
from tests.appliance.conftest import Api, pinned, seed_app, seed_image

__all__ = ["agent"]  # the fixture: a real agent, for the hosts' VM list

SECRET = "Zk3vQ9-pW2_xR7mN4bT8yL1c"


@dataclass
class Presented:
    image: str  # a presented (mounted) copy with an NBD export
    base: str
    job: str  # the mount job that made it, started by the "operator" token
    uri: str


def present(api: Api, tmp_path: Path, actor: str = "operator") -> Presented:
    """A mount image presented over NBD and the succeeded job that presented it, as the
    mount operation leaves them (the runner is not needed to show what is stored)."""
    seed_app(api.appliance)
    source = tmp_path / "src"
    source.mkdir(exist_ok=True)
    (source / "a.txt").write_text("hello")
    base = seed_image(api.appliance, "web", source)
    with api.appliance.catalog.begin() as session:
        parent = q.get_image(session, image_id=base)
        row = q.add_image(
            session, app="web", kind=ImageKind.MOUNT, manifest=parent.manifest, parent_id=base
        )
        uri = f"nbd://127.0.0.1:10809/{row.id}.{SECRET}"
        q.set_image_state(
            session, image_id=row.id, state=ImageState.MOUNTED, mounted_host="h1", nbd_export=uri
        )
        job = submit_job(session, type="mount", image=row.id, actor=actor)
        job.status = JobStatus.SUCCEEDED
        job.message = f"{base} mounted as {row.id} on host h1"
        job.result = {"image": row.id, "nbd_uri": uri, "paths": []}
        # an agent's error that echoed the URI must not make the log a capability
        q.add_job_log(session, job_id=job.id, text=f"nbd-client could not attach {uri}")
        return Presented(row.id, base, job.id, uri)


def test_viewers_never_see_an_export_in_the_api(api: Api, tmp_path: Path) -> None:
    shown = present(api, tmp_path)
    viewer = api.headers("viewer")
    image = api.client.get(f"/api/v1/images/{shown.image}", headers=viewer).json()
    assert image["nbd_uri"] is None and image["nbd_exported"] is True
    job = api.client.get(f"/api/v1/jobs/{shown.job}", headers=viewer).json()
    assert job["result"] == {"image": shown.image, "nbd_uri": None, "paths": []}
    listed = api.client.get("/api/v1/jobs", headers=viewer).json()
    assert [j["result"]["nbd_uri"] for j in listed if j["id"] == shown.job] == [None]
    log = api.client.get(f"/api/v1/jobs/{shown.job}/log", headers=viewer).json()
    assert log[0]["text"] == (
        f"nbd-client could not attach nbd://127.0.0.1:10809/{shown.image}.(secret hidden)"
    )
    refused = api.client.post(f"/api/v1/images/{shown.image}/export", headers=viewer)
    assert refused.status_code == 403 and refused.json()["error"] == "Forbidden"


def fill(path: str, shown: Presented) -> str:
    return (
        path.replace("{name}", "web")
        .replace("{image_id}", shown.image)
        .replace("{job_id}", shown.job)
    )


def test_no_get_answer_holds_the_secret_for_a_viewer(api: Api, tmp_path: Path) -> None:
    """Every readable call of the published API, with real ids, as a viewer."""
    shown = present(api, tmp_path)
    paths = api.appliance.app.openapi()["paths"]
    read = 0
    for path, methods in paths.items():
        if "get" not in methods or "{sid}" in path:
            continue
        answer = api.client.get(fill(path, shown), headers=api.headers("viewer"))
        assert SECRET not in answer.text, path
        read += answer.status_code == 200
    assert read >= 14
    assert SECRET not in api.client.get("/metrics", headers=api.headers("viewer")).text


def test_the_operator_who_started_the_job_sees_its_export(api: Api, tmp_path: Path) -> None:
    shown = present(api, tmp_path, actor="operator")
    _, other = tokens.add_token(api.appliance.site, name="other-operator", role=Role.OPERATOR)
    results = {}
    for who, headers in (
        ("starter", api.headers("operator")),
        ("admin", api.headers("admin")),
        ("other", {"Authorization": f"Bearer {other}"}),
        ("viewer", api.headers("viewer")),
    ):
        job = api.client.get(f"/api/v1/jobs/{shown.job}", headers=headers).json()
        results[who] = job["result"]["nbd_uri"]
    assert results == {"starter": shown.uri, "admin": shown.uri, "other": None, "viewer": None}
    # nobody reads it from the image document: it is asked for on purpose
    image = api.client.get(f"/api/v1/images/{shown.image}", headers=api.headers()).json()
    assert image["nbd_uri"] is None


def test_an_operator_asks_for_the_export_and_the_request_is_audited(
    api: Api, tmp_path: Path
) -> None:
    shown = present(api, tmp_path)
    answer = api.client.post(
        f"/api/v1/images/{shown.image}/export", headers=api.headers("operator")
    )
    assert answer.status_code == 200
    assert answer.json() == {"image": shown.image, "nbd_uri": shown.uri, "nbd_fingerprint": None}
    not_presented = api.client.post(
        f"/api/v1/images/{shown.base}/export", headers=api.headers("operator")
    )
    assert not_presented.status_code == 409
    assert not_presented.json()["message"] == (
        f"Image {shown.base} is not presented as an NBD export. Present it first, e.g. with "
        f"`tandem mount {shown.base} --host HOST --action map-only`."
    )
    with api.appliance.catalog.read() as session:
        audited = [(r.actor, r.method, r.path, r.status) for r in q.list_audit(session)]
    assert ("operator", "POST", f"/api/v1/images/{shown.image}/export", 200) in audited


@contextmanager
def console(api: Api, role: str) -> Iterator[httpx.Client]:
    """A browser-like client signed in to the console with the ``role`` token."""
    appliance = api.appliance
    with httpx.Client(
        base_url=appliance.site.url, verify=pinned(appliance.directory), timeout=120.0
    ) as client:
        signed = client.post("/sign-in", data={"token": api.tokens[role], "next": "/apps"})
        assert signed.status_code == 303
        yield client


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_console_pages_do_not_show_the_export(api: Api, tmp_path: Path, role: str) -> None:
    shown = present(api, tmp_path)
    pages = [
        "/apps",
        "/apps/web",
        f"/apps/web?image={shown.image}",
        "/apps/web/report",
        "/monitor",
        "/monitor/rows",
        f"/jobs/{shown.job}",
        f"/jobs/{shown.job}/status",
    ]
    with console(api, role) as c:
        for path in pages:
            answer = c.get(path)
            assert answer.status_code == 200, path
            assert SECRET not in answer.text, path
        page = c.get(f"/apps/web?image={shown.image}").text
        facts = page[page.index('id="nbd-export"') :].split("</dd>")[0]
        if role == "viewer":
            assert "Show NBD export" not in facts and "operator can show" in facts
        else:
            assert 'id="show-export"' in facts


def test_an_operator_shows_the_export_in_the_console(api: Api, tmp_path: Path) -> None:
    shown = present(api, tmp_path)
    with console(api, "viewer") as c:
        page = c.get(f"/apps/web?image={shown.image}")
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
        assert csrf
        refused = c.post("/apps/web/export", data={"csrf": csrf.group(1), "image": shown.image})
        assert refused.status_code == 403 and SECRET not in refused.text
    with console(api, "operator") as c:
        page = c.get(f"/apps/web?image={shown.image}")
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
        assert csrf
        answer = c.post("/apps/web/export", data={"csrf": csrf.group(1), "image": shown.image})
        assert answer.status_code == 200
        assert f'<span class="mono break" id="nbd-uri">{shown.uri}</span>' in answer.text
        plain = c.post("/apps/web/export", data={"csrf": csrf.group(1), "image": shown.base})
        assert plain.status_code == 409 and "is not presented as an NBD export" in plain.text
    with api.appliance.catalog.read() as session:
        audited = [(r.actor, r.path, r.status) for r in q.list_audit(session)]
    assert ("operator", "/apps/web/export", 200) in audited
    assert ("viewer", "/apps/web/export", 403) in audited


def test_the_vms_of_a_host_show_no_export_secret(
    api: Api, agent: Agent, libvirt_host: None
) -> None:
    """A VM tandem defined over a presented image has its disks on the NBD export: the
    host's domain list (``GET /hosts/{name}/vms``, readable by a viewer) shows the export's
    name with the secret blanked, for every role (the export is asked for, audited)."""
    new = f"tandem-test-nbd-{os.getpid()}"
    vmguest.remove_domain(new)
    body = define_body(new, "the-source")
    body["nbd_uri"] = f"nbd://127.0.0.1:10809/img-aaaaaaaaaaaa.{SECRET}"
    defined = agent.client.post("/api/v1/vms/define", headers=agent.auth, json=body)
    assert defined.status_code == 200, defined.text
    try:
        with api.appliance.catalog.begin() as session:
            q.add_host(
                session,
                name="hv",
                url=str(agent.client.base_url),
                token=agent.token,
                fingerprint=load_daemon_dir(agent.directory, "agent").fingerprint,
            )
        for role in ("viewer", "operator", "admin"):
            answer = api.client.get("/api/v1/hosts/hv/vms", headers=api.headers(role))
            assert answer.status_code == 200, answer.text
            assert SECRET not in answer.text, role
            (vm,) = [d for d in answer.json()["domains"] if d["name"] == new]
            assert [d["source"] for d in vm["disks"]] == ["img-aaaaaaaaaaaa.(secret hidden)"]
    finally:
        vmguest.remove_domain(new)
