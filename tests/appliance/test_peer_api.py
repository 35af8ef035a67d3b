"""The peer API over HTTPS: the other site's token is a peer's, not an admin's.

It can send replicas (which define no host, path or command here), read state, and request
the steps of a failback this site agreed to; every other shape is refused before anything
changes. (Two live sites exercise the allowed calls in tests/operations/test_peer_trust.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tandem.catalog import queries as q
from tandem.domain.ids import new_app_id, new_image_id
from tandem.domain.jobs import JobStatus
from tandem.domain.rules import Role
from tandem.operations import peers, tokens
from tests.appliance.conftest import Api, api, booted, seed_app, seed_image
from tests.catalog.conftest import catalog_url

__all__ = ["api", "booted", "catalog_url"]

MANIFEST = "ab" * 32


@pytest.fixture
def peer(api: Api) -> dict[str, str]:
    """Headers of the token the paired site ``prod`` calls this one with."""
    with api.appliance.catalog.begin() as session:
        q.add_peer(
            session, name="prod", url="https://127.0.0.1:1", token="t", fingerprint="00" * 32
        )
    _, secret = tokens.add_token(api.appliance.site, name="peer-prod", role=Role.PEER)
    return {"Authorization": f"Bearer {secret}"}


def _replication(app: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "app": app,
        "image": {
            "id": new_image_id(),
            "created": "2026-01-01T00:00:00+00:00",
            "label": None,
            "size": 0,
            "manifest": MANIFEST,
        },
        "epoch": 1,
        **extra,
    }


def _app(api: Api, name: str) -> Any:
    with api.appliance.catalog.read() as session:
        return q.get_app(session, name=name)


def seed_mirrored(api: Api, name: str) -> None:
    """An app of this site (host ``h1``, not contacted) that it mirrors to the peer."""
    seed_app(api.appliance, name, template="mirrored")
    with api.appliance.catalog.begin() as session:
        next(t for t in q.list_templates(session) if t.name == "mirrored").mirror = True


def _jobs(api: Api) -> list[Any]:
    with api.appliance.catalog.read() as session:
        return q.list_jobs(session, limit=100)


def test_a_replica_defines_no_host_path_or_command_here(api: Api, peer: dict[str, str]) -> None:
    """Reproduction: an app object with a host, a path and commands created that app here,
    and the peer then had its command run as root on that host."""
    c = api.client
    evil = {
        "id": new_app_id(),
        "name": "evil",
        "kind": "filesystem",
        "host": "h1",
        "path": "/etc",
        "start": "touch /tmp/pwned",
        "stop": "touch /tmp/pwned",
    }
    r = c.post("/api/v1/peer/replications", headers=peer, json=_replication(evil))
    assert r.status_code == 422, r.text
    assert "extra" in r.text.lower() or "not permitted" in r.text.lower()
    assert c.get("/api/v1/apps/evil", headers=api.headers()).status_code == 404

    # What a replica may say: name, kind, the peer's app id (and where production runs,
    # for display). It makes a mirror record here, with no command at all.
    plain = {"id": evil["id"], "name": "evil", "kind": "filesystem"}
    shown = {"host": "h1", "path": "/etc"}
    r = c.post(
        "/api/v1/peer/replications", headers=peer, json=_replication(plain, production=shown)
    )
    assert r.status_code == 200, r.text
    row = _app(api, "evil")
    assert row.origin == "prod" and row.start_hook is None and row.stop_hook is None
    assert c.get("/api/v1/apps/evil", headers=api.headers()).json()["origin"] == "prod"

    # ... on which the peer can run nothing,
    r = c.post("/api/v1/peer/apps/evil/command", headers=peer, json={"which": "start"})
    assert r.status_code == 409, r.text
    assert "mirror of 'prod'" in r.json()["message"]
    # ... and this site acts on no host or path of it: capture and restore are refused.
    seed_app(api.appliance, "other")  # registers host h1 here: the mirror names it too
    r = c.post("/api/v1/apps/evil/capture", headers=api.headers("operator"), json={})
    assert r.status_code == 409 and r.json()["error"] == "MirrorRecord", r.text
    assert "Run the capture at production (prod)" in r.json()["message"]
    r = c.post(
        "/api/v1/apps/evil/restore",
        headers=api.headers("operator"),
        json={"image": new_image_id(), "confirm": ["DATA LOSS", "OVERWRITE OTHER APPS"]},
    )
    assert r.status_code in (404, 409), r.text  # no such image here, or refused as a mirror
    assert not any(j.app == "evil" for j in _jobs(api))


def test_apply_names_no_path_and_needs_an_agreed_failback(
    api: Api, peer: dict[str, str], tmp_path: Path
) -> None:
    """Reproduction: ``apply {"image", "path": "/any/folder"}`` with no failback under way
    changed the app's path for good and restored over that folder."""
    c = api.client
    seed_mirrored(api, "www")
    source = tmp_path / "src"
    source.mkdir()
    (source / "index.html").write_text("hello\n")
    image = seed_image(api.appliance, "www", source)

    r = c.post(
        "/api/v1/peer/apps/www/apply", headers=peer, json={"image": image, "path": "/any/folder"}
    )
    assert r.status_code == 422, r.text
    r = c.post("/api/v1/peer/apps/www/apply", headers=peer, json={"image": image})
    assert r.status_code == 409, r.text
    assert "does not know it as failed over at prod" in r.json()["message"]
    # failed over at the peer, but no failback agreed: still nothing
    with api.appliance.catalog.begin() as session:
        q.get_app(session, name="www").peer_active = True
    r = c.post("/api/v1/peer/apps/www/apply", headers=peer, json={"image": image})
    assert r.status_code == 409, r.text
    assert "no failback of it was agreed here" in r.json()["message"]
    assert _app(api, "www").path == "/srv/www"
    assert not any(j.type == "restore" for j in _jobs(api))


def test_commands_only_for_an_app_failed_over_at_the_peer_with_an_agreed_failback(
    api: Api, peer: dict[str, str]
) -> None:
    c = api.client
    seed_mirrored(api, "www")  # its host's agent is never reached: refused before
    with api.appliance.catalog.begin() as session:
        q.set_app_hooks(session, name="www", hooks={"stop": "www-stop", "start": "www-start"})
    for which in ("stop", "start"):
        r = c.post("/api/v1/peer/apps/www/command", headers=peer, json={"which": which})
        assert r.status_code == 409, r.text
        assert "does not know it as failed over at prod" in r.json()["message"]
    with api.appliance.catalog.begin() as session:
        q.get_app(session, name="www").peer_active = True
    r = c.post("/api/v1/peer/apps/www/command", headers=peer, json={"which": "stop"})
    assert r.status_code == 409, r.text
    assert "no failback of it was agreed" in r.json()["message"]
    assert "tandem failback www --target" in r.json()["message"]
    r = c.post("/api/v1/peer/apps/www/failback-undo", headers=peer, json={})
    assert r.status_code == 409, r.text


def test_a_peer_token_makes_only_peer_calls_and_only_peers_make_them(
    api: Api, peer: dict[str, str]
) -> None:
    c = api.client
    seed_mirrored(api, "www")
    for method, path in (
        ("GET", "/api/v1/apps"),
        ("POST", "/api/v1/apps/www/capture"),
        ("POST", "/api/v1/apps/www/restore"),
        ("POST", "/api/v1/tokens"),
        ("GET", "/api/v1/hosts"),
    ):
        r = c.request(method, path, headers=peer, json={})
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"] == "Forbidden"
    # an admin (or operator) token is no peer: the peer calls need the peer's identity,
    # which a token only named like a peer's does not have
    _, named = tokens.add_token(api.appliance.site, name="peer-lookalike", role=Role.ADMIN)
    lookalike = {"Authorization": f"Bearer {named}"}
    for headers in (*(api.headers(role) for role in ("admin", "operator", "viewer")), lookalike):
        r = c.get("/api/v1/peer/apps/www/replicas", headers=headers)
        assert r.status_code == 403, r.text
    # a peer token of a site this one is not paired with (made by hand, say) is no peer
    _, ghost = tokens.add_token(api.appliance.site, name="peer-ghost", role=Role.PEER)
    r = c.post(
        "/api/v1/peer/apps/www/failed-over",
        headers={"Authorization": f"Bearer {ghost}"},
        json={"epoch": 9},
    )
    assert r.status_code == 403, r.text
    assert "not paired with 'ghost'" in r.json()["message"], r.text
    assert not _app(api, "www").peer_active
    # the peer sees only the jobs it asked for
    job = next(iter(_jobs(api)), None)
    assert job is None
    r = c.post("/api/v1/apps/www/capture", headers=api.headers("operator"), json={})
    assert r.status_code == 202, r.text
    job_id = r.json()["job"]["id"]
    r = c.get(f"/api/v1/peer/jobs/{job_id}", headers=peer)
    assert r.status_code == 404, r.text


@pytest.mark.parametrize(
    ("method", "path", "body", "where"),
    [
        ("POST", "/api/v1/peer/replications", {"surprise": 1}, "surprise"),
        ("POST", "/api/v1/peer/syncbacks", {"app": "www", "command": "id"}, "command"),
        ("POST", "/api/v1/peer/apps/www/command", {"which": "rm -rf /"}, "which"),
        ("POST", "/api/v1/peer/apps/www/command", {"which": "stop", "cmd": "id"}, "cmd"),
        ("POST", "/api/v1/peer/apps/www/apply", {"image": "../../etc"}, "image"),
        ("POST", "/api/v1/peer/apps/www/apply", {"image": "img_aaaaaaaaaaaa", "host": "h"}, "host"),
        (
            "POST",
            "/api/v1/peer/apps/www/failback-check",
            {"target": "new", "host": "h1", "path": "relative", "epoch": 2},
            "path",
        ),
        (
            "POST",
            "/api/v1/peer/apps/www/failback-check",
            {"target": "original", "epoch": 2, "start": "id"},
            "start",
        ),
        ("POST", "/api/v1/peer/apps/w%20w/resume", {"epoch": 2}, "name"),
        ("GET", "/api/v1/peer/jobs/..%2Fapps", None, "job_id"),
        ("POST", "/api/v1/peer/apps/www/failed-over", {"epoch": 0}, "epoch"),
    ],
)
def test_every_other_shape_is_refused(
    api: Api, peer: dict[str, str], method: str, path: str, body: Any, where: str
) -> None:
    seed_mirrored(api, "www")
    r = api.client.request(method, path, headers=peer, json=body)
    assert r.status_code in (404, 422), r.text
    if r.status_code == 422:
        assert where in r.text
    row = _app(api, "www")
    assert (row.host, row.path, row.peer_active) == ("h1", "/srv/www", False)
    assert all(j.status is JobStatus.QUEUED and j.type != "restore" for j in _jobs(api))


def test_an_app_of_this_site_is_never_altered_by_the_peer(api: Api, peer: dict[str, str]) -> None:
    seed_mirrored(api, "www")
    own = _app(api, "www")
    plain = {"id": own.id, "name": "www", "kind": "filesystem"}
    r = api.client.post("/api/v1/peer/replications", headers=peer, json=_replication(plain))
    assert r.status_code == 409 and "not a mirror of 'prod'" in r.text, r.text
    r = api.client.get("/api/v1/peer/apps/www/replicas", headers=peer)
    assert r.status_code == 409, r.text
    # telling this site that its own app failed over needs a newer writer epoch
    r = api.client.post("/api/v1/peer/apps/www/failed-over", headers=peer, json={"epoch": 1})
    assert r.status_code == 409, r.text
    assert not _app(api, "www").peer_active


def test_a_failback_is_not_agreed_again_while_one_of_its_steps_runs(
    api: Api, peer: dict[str, str]
) -> None:
    """Agreeing again resets the app's identity: never under a restore that is applying."""
    from tandem.jobs.queue import submit_job

    seed_mirrored(api, "www")
    with api.appliance.catalog.begin() as session:
        q.get_app(session, name="www").peer_active = True
        submit_job(session, type="restore", app="www", lifecycle=True, actor="peer-prod")
    r = api.client.post(
        "/api/v1/peer/apps/www/failback-check",
        headers=peer,
        json={"target": "original", "epoch": 2},
    )
    assert r.status_code == 409, r.text
    assert "its restore job" in r.json()["message"] and "is queued here" in r.json()["message"]


def test_the_peer_acts_on_no_app_this_site_does_not_mirror_to_it(
    api: Api, peer: dict[str, str]
) -> None:
    """An app of this site that is not mirrored to the peer is none of the peer's business:
    a "newer writer epoch" once marked any app failed over at the peer, after which the peer
    could stop it on its host and restore a syncback of its own over its data."""
    c = api.client
    seed_app(api.appliance, "payroll")  # protected here, by a template that does not mirror
    with api.appliance.catalog.begin() as session:
        q.set_app_hooks(session, name="payroll", hooks={"stop": "payroll-stop"})
    image = {
        "id": new_image_id(),
        "created": "2026-01-01T00:00:00+00:00",
        "size": 0,
        "manifest": MANIFEST,
    }
    for path, body in (
        ("/api/v1/peer/apps/payroll/failed-over", {"epoch": 9}),
        ("/api/v1/peer/apps/payroll/failback-check", {"target": "original", "epoch": 9}),
        ("/api/v1/peer/syncbacks", {"app": "payroll", "image": image, "epoch": 9}),
        ("/api/v1/peer/apps/payroll/command", {"which": "stop"}),
    ):
        r = c.post(path, headers=peer, json=body)
        assert r.status_code == 409, (path, r.text)
        assert "this site does not mirror it to prod" in r.json()["message"], r.text
    r = c.get("/api/v1/peer/apps/payroll/restored", headers=peer)
    assert r.status_code == 409, r.text
    r = c.post("/api/v1/peer/apps/payroll/resume", headers=peer, json={"epoch": 9})
    assert r.status_code == 200 and r.json()["known"] is False, r.text
    row = _app(api, "payroll")
    assert (row.peer_active, row.writer_epoch) == (False, 1)
    with api.appliance.catalog.read() as session:
        assert peers.agreement(session, app_id=row.id) is None


def test_no_failback_step_moves_the_app_under_a_restore_that_is_applying(
    api: Api, peer: dict[str, str]
) -> None:
    """An undo (or a start) requested while production's restore of the failback is queued
    or running would move the app back to its former location under the restore, or start
    it on half-written data: refused until that job has ended."""
    from tandem.jobs.queue import submit_job

    seed_mirrored(api, "www")
    with api.appliance.catalog.begin() as session:
        q.set_app_hooks(session, name="www", hooks={"start": "www-start"})
        row = q.get_app(session, name="www")
        row.peer_active = True
        # agreed onto a restored target, whose identity the app took for the apply
        peers.set_agreement(
            session,
            app_id=row.id,
            doc={
                "peer": "prod",
                "target": "restored",
                "host": "h1",
                "path": "/srv/www2",
                "target_app": "www2",
                "previous": {"host": "h1", "path": "/srv/www"},
            },
        )
        row.path = "/srv/www2"
        submit_job(session, type="restore", app="www", lifecycle=True, actor="peer-prod")
    for path, body in (
        ("/api/v1/peer/apps/www/failback-undo", {}),
        ("/api/v1/peer/apps/www/command", {"which": "start"}),
    ):
        r = api.client.post(path, headers=peer, json=body)
        assert r.status_code == 409, (path, r.text)
        assert "its restore job" in r.json()["message"], r.text
    assert _app(api, "www").path == "/srv/www2"


def test_an_apply_that_cannot_start_leaves_the_app_where_it_was(
    api: Api, peer: dict[str, str], tmp_path: Path
) -> None:
    """The app took the target's identity before its restore was queued: when another job of
    the app refused the restore, production's app was left pointing at the target."""
    from tandem.domain.images import ImageKind
    from tandem.jobs.queue import submit_job

    seed_mirrored(api, "www")
    source = tmp_path / "src"
    source.mkdir()
    (source / "index.html").write_text("hello\n")
    image = seed_image(api.appliance, "www", source)
    with api.appliance.catalog.begin() as session:
        row = q.get_image(session, image_id=image)
        row.kind, row.origin = ImageKind.SYNCBACK, "prod"
        app = q.get_app(session, name="www")
        app.peer_active = True
        peers.set_agreement(
            session,
            app_id=app.id,
            doc={
                "peer": "prod",
                "target": "restored",
                "host": "h1",
                "path": "/srv/www2",
                "target_app": "www2",
                "previous": None,
            },
        )
        submit_job(session, type="capture", app="www", lifecycle=True, actor="operator")
    r = api.client.post("/api/v1/peer/apps/www/apply", headers=peer, json={"image": image})
    assert r.status_code == 409, r.text
    assert "its capture job" in r.json()["message"], r.text
    assert _app(api, "www").path == "/srv/www"
    with api.appliance.catalog.read() as session:
        doc = peers.agreement(session, app_id=_app(api, "www").id)
    assert doc is not None and doc["previous"] is None


def test_a_syncback_opened_before_its_capture_takes_its_image_once_at_commit(
    api: Api, peer: dict[str, str]
) -> None:
    """A volume's syncback is opened at production before the DR site captures it (its
    chunks go while the capture stores them), so its image comes with the commit: offered
    once, for a manifest that arrived, under an id production does not hold."""
    from tandem.storage.manifest import VolumeManifest, encode_manifest

    c = api.client
    seed_mirrored(api, "www")
    blob = encode_manifest(VolumeManifest(size=0, chunks=[]))

    def opened(**body: Any) -> tuple[str, dict[str, str]]:
        r = c.post("/api/v1/peer/syncbacks", headers=peer, json={"app": "www", "epoch": 2, **body})
        assert r.status_code == 200, r.text
        sid, token = r.json()["session"], r.json()["token"]
        return sid, {"Authorization": f"Bearer {token}"}

    def offer(manifest: str, image_id: str | None = None) -> dict[str, Any]:
        created = "2026-01-01T00:00:00+00:00"
        return {
            "id": image_id or new_image_id(),
            "created": created,
            "size": 0,
            "manifest": manifest,
        }

    def commit(sid: str, own: dict[str, str], **body: Any) -> Any:
        token = own["Authorization"].split()[1]
        path = f"/api/v1/peer/syncbacks/{sid}/commit"
        return c.post(path, headers=peer, json={"token": token, **body})

    sid, own = opened()
    r = c.post(f"/api/v1/sessions/{sid}/manifest", headers=own, content=blob)
    assert r.status_code == 200, r.text
    mid = r.json()["manifest"]
    r = commit(sid, own)  # no offer at either end
    assert r.status_code == 422 and "offered once" in r.json()["message"], r.text
    r = commit(sid, own, image=offer(MANIFEST))  # not the manifest that arrived
    assert r.status_code == 422 and "was not received" in r.json()["message"], r.text
    taken = offer(mid)
    r = commit(sid, own, image=taken)
    assert r.status_code == 200, r.text
    with api.appliance.catalog.read() as session:
        image = q.get_image(session, image_id=taken["id"])
        assert (image.kind, image.manifest, image.origin) == ("syncback", mid, "prod")

    # the same image again, through a session opened without it: refused at its commit
    sid, own = opened()
    assert c.post(f"/api/v1/sessions/{sid}/manifest", headers=own, content=blob).status_code == 200
    r = commit(sid, own, image=offer(mid, taken["id"]))
    assert r.status_code == 409, r.text
    # offered at the open: not again at the commit
    sid, own = opened(image=offer(mid))
    assert c.post(f"/api/v1/sessions/{sid}/manifest", headers=own, content=blob).status_code == 200
    r = commit(sid, own, image=offer(mid))
    assert r.status_code == 422 and "offered once" in r.json()["message"], r.text
