"""The appliance API through FastAPI's TestClient: auth, roles, audit, errors, metrics."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tandem.catalog import queries as q
from tandem.domain.lifecycle import AppKind
from tandem.domain.rules import Role
from tandem.errors import Forbidden, InvalidInput
from tandem.operations import apps
from tests.appliance.conftest import Api, seed_app, seed_image
from tests.poolfiles import age_pool, chunk_file

CONFIRM = ["DATA LOSS", "OVERWRITE OTHER APPS"]


def error(resp: object) -> tuple[int, str, str]:
    body = resp.json()  # type: ignore[attr-defined]
    return resp.status_code, body["error"], body["message"]  # type: ignore[attr-defined]


def test_health_and_openapi_need_no_token(api: Api) -> None:
    health = api.client.get("/health")
    assert health.status_code == 200 and health.json()["name"] == "site-a"
    spec = api.client.get("/openapi.json").json()
    assert "/api/v1/apps/{name}/capture" in spec["paths"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({}, "No API token was sent"),
        ({"Authorization": "Bearer nope"}, "The API token is wrong"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "No API token was sent"),
    ],
)
def test_missing_or_wrong_token_is_401_saying_so(
    api: Api, headers: dict[str, str], says: str
) -> None:
    for method, path in (
        ("GET", "/api/v1/apps"),
        ("POST", "/api/v1/templates"),
        ("GET", "/metrics"),
    ):
        status, code, message = error(api.client.request(method, path, headers=headers, json={}))
        assert (status, code) == (401, "Unauthorized")
        assert says in message


def test_roles(api: Api) -> None:
    seed_app(api.appliance)
    viewer, operator = api.headers("viewer"), api.headers("operator")
    assert api.client.get("/api/v1/apps", headers=viewer).status_code == 200
    status, code, message = error(api.client.post("/api/v1/apps/web/capture", headers=viewer))
    assert (status, code) == (403, "Forbidden")
    assert message == (
        "Role 'viewer' may not POST /api/v1/apps/web/capture. Use a token with the operator role."
    )
    assert api.client.post("/api/v1/apps/web/capture", headers=operator).status_code == 202
    for method in ("GET", "POST"):
        status, _, message = error(
            api.client.request(
                method, "/api/v1/tokens", headers=operator, json={"name": "x", "role": "viewer"}
            )
        )
        assert status == 403 and "needs" not in message and "admin role" in message
    made = api.client.post(
        "/api/v1/tokens", headers=api.headers(), json={"name": "ci", "role": "viewer"}
    )
    assert made.status_code == 201 and made.json()["token"]
    listed = api.client.get("/api/v1/tokens", headers=api.headers()).json()
    assert {t["name"] for t in listed} == {"admin", "operator", "viewer", "ci"}
    assert all("token" not in t for t in listed)
    who = api.client.get(
        "/api/v1/info", headers={"Authorization": f"Bearer {made.json()['token']}"}
    )
    assert who.json()["you"] == "ci" and who.json()["role"] == "viewer"


def test_last_admin_token_cannot_go(api: Api) -> None:
    status, _, message = error(api.client.delete("/api/v1/tokens/admin", headers=api.headers()))
    assert status == 409 and "last admin token" in message
    assert api.client.delete("/api/v1/tokens/viewer", headers=api.headers()).status_code == 200
    assert api.client.get("/api/v1/apps", headers=api.headers("viewer")).status_code == 401


def test_every_state_changing_call_is_audited(api: Api) -> None:
    seed_app(api.appliance)
    api.client.post("/api/v1/templates", headers=api.headers("operator"), json={"name": "t1"})
    api.client.post("/api/v1/apps/web/capture", headers=api.headers("viewer"))
    api.client.post("/api/v1/templates", headers={"Authorization": "Bearer bad"}, json={})
    api.client.get("/api/v1/apps", headers=api.headers())
    api.client.post("/api/v1/sessions/abc/missing", headers=api.headers(), json={"digests": []})
    with api.appliance.catalog.read() as session:
        rows = [(r.actor, r.role, r.method, r.path, r.status) for r in q.list_audit(session)]
    assert rows == [
        (None, None, "POST", "/api/v1/templates", 401),
        ("viewer", "viewer", "POST", "/api/v1/apps/web/capture", 403),
        ("operator", "operator", "POST", "/api/v1/templates", 201),
    ]


def test_bad_input_is_4xx_naming_the_problem(api: Api) -> None:
    h = api.headers()
    cases = [
        ("POST", "/api/v1/templates", {"name": "t", "keep": 0}, 422, "keep"),
        ("POST", "/api/v1/templates", {"name": "t", "keep": 10**30}, 422, "keep"),
        ("POST", "/api/v1/templates", {"name": "t", "every": "soon"}, 422, "not an interval"),
        ("POST", "/api/v1/templates", {"name": "../x"}, 422, "name"),
        ("POST", "/api/v1/templates", {"name": "t", "colour": "red"}, 422, "colour"),
        (
            "POST",
            "/api/v1/apps",
            {"name": "a", "host": "h", "kind": "container", "path": "/x"},
            422,
            "kind",
        ),
        (
            "POST",
            "/api/v1/apps",
            {"name": "a", "host": "h", "kind": "vm", "path": "/x"},
            422,
            "--domain",
        ),
        (
            "POST",
            "/api/v1/apps",
            {"name": "a", "host": "nohost", "kind": "volume", "path": "/x"},
            404,
            "host 'nohost' does not exist",
        ),
        ("GET", "/api/v1/apps/nope", None, 404, "application 'nope' does not exist"),
        ("GET", "/api/v1/images/img_aaaaaaaaaaaa", None, 404, "image 'img_aaaaaaaaaaaa'"),
        ("GET", "/api/v1/jobs/job_aaaaaaaaaaaa", None, 404, "job 'job_aaaaaaaaaaaa' does not"),
        ("GET", "/api/v1/jobs/job_x", None, 422, "job_id: String should match pattern"),
        ("GET", "/api/v1/jobs?limit=0", None, 422, "limit"),
        ("GET", "/api/v1/jobs?status=bogus", None, 422, "status"),
        ("POST", "/api/v1/apps/nope/capture", None, 404, "application 'nope'"),
        ("GET", "/api/v1/nothing-here", None, 404, "no API path /api/v1/nothing-here"),
        ("PUT", "/api/v1/apps", None, 405, "PUT is not allowed"),
    ]
    for method, path, body, status, says in cases:
        resp = api.client.request(method, path, headers=h, json=body)
        assert resp.status_code == status, (path, body, resp.text)
        assert says in resp.json()["message"], (path, body, resp.text)
    api.client.post("/api/v1/templates", headers=h, json={"name": "t", "every": "1h30m"})
    status, code, message = error(
        api.client.post("/api/v1/templates", headers=h, json={"name": "t"})
    )
    assert (status, code) == (409, "AlreadyExists") and "template 't' already exists" in message
    shown = api.client.get("/api/v1/templates/t", headers=h).json()
    assert (shown["every"], shown["every_seconds"]) == ("1h30m", 5400)


def test_capture_queue_holds_one_lifecycle_job_per_app(api: Api) -> None:
    seed_app(api.appliance)
    seed_app(api.appliance, "idle", managed=False)
    h = api.headers("operator")
    job = api.client.post("/api/v1/apps/web/capture", headers=h, json={"label": "x"}).json()["job"]
    assert (job["type"], job["app"], job["status"]) == ("capture", "web", "queued")
    status, code, message = error(api.client.post("/api/v1/apps/web/capture", headers=h))
    assert (status, code) == (409, "AppBusy") and job["id"] in message
    status, code, message = error(api.client.post("/api/v1/apps/idle/capture", headers=h))
    assert (status, code) == (409, "InvalidTransition")
    assert "is unmanaged; capture is not allowed" in message
    canceled = api.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=h).json()["job"]
    assert canceled["status"] == "canceled"
    assert api.client.post("/api/v1/apps/web/capture", headers=h).status_code == 202
    jobs = api.client.get("/api/v1/jobs?app=web&status=canceled", headers=h).json()
    assert [j["id"] for j in jobs] == [job["id"]]


def test_restore_needs_both_confirmations_and_the_apps_own_image(api: Api, tmp_path: Path) -> None:
    seed_app(api.appliance)
    seed_app(api.appliance, "other")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    mine = seed_image(api.appliance, "web", tmp_path / "src")
    theirs = seed_image(api.appliance, "other", tmp_path / "src")
    h = api.headers("operator")
    for confirm in ([], ["DATA LOSS"], ["data loss", "overwrite other apps"]):
        status, code, message = error(
            api.client.post(
                "/api/v1/apps/web/restore", headers=h, json={"image": mine, "confirm": confirm}
            )
        )
        assert (status, code) == (422, "ConfirmationRequired")
        assert '"DATA LOSS" and "OVERWRITE OTHER APPS"' in message
    # the second warning is answered after the first, not before (SPEC §4.4)
    status, code, message = error(
        api.client.post(
            "/api/v1/apps/web/restore", headers=h, json={"image": mine, "confirm": CONFIRM[::-1]}
        )
    )
    assert (status, code) == (422, "ConfirmationOutOfOrder")
    assert 'type "DATA LOSS", then "OVERWRITE OTHER APPS", in this order' in message
    status, _, message = error(
        api.client.post(
            "/api/v1/apps/web/restore", headers=h, json={"image": theirs, "confirm": CONFIRM}
        )
    )
    assert status == 422 and "belongs to application 'other'" in message
    assert api.client.get("/api/v1/jobs", headers=h).json() == []
    job = api.client.post(
        "/api/v1/apps/web/restore", headers=h, json={"image": mine, "confirm": CONFIRM}
    ).json()["job"]
    assert (job["type"], job["image"], job["status"]) == ("restore", mine, "queued")


def test_image_delete_job_marks_and_the_gc_job_collects(api: Api, tmp_path: Path) -> None:
    seed_app(api.appliance)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(300_000))
    old = seed_image(api.appliance, "web", src)
    (src / "a").write_bytes(os.urandom(300_000))
    new = seed_image(api.appliance, "web", src)
    h = api.headers("operator")
    listed = api.client.get("/api/v1/apps/web/images", headers=h).json()
    assert [i["id"] for i in listed] == [new, old]
    assert {"id", "kind", "app", "created", "label", "size", "manifest", "origin", "state"} <= set(
        listed[0]
    )
    assert api.client.get(f"/api/v1/images/{old}/verify", headers=h).json()["ok"]

    age_chunks(api)
    api.appliance.runner.start()
    chunks_before = sum(1 for _ in api.appliance.site.pool.iter_chunks())
    # What only the old image holds: its file's chunks (one or two: the chunker cuts random
    # bytes where their content says) and nothing the new image shares.
    only_old = image_chunks(api, old) - image_chunks(api, new)
    assert only_old
    job = api.client.delete(f"/api/v1/images/{old}", headers=h).json()["job"]
    done = api.appliance.runner.wait(job["id"], timeout=30)
    assert done.status.value == "succeeded", done.message
    assert "next garbage collection" in done.message
    # Deleting only removed the row: the pool is untouched until a collection runs.
    assert sum(1 for _ in api.appliance.site.pool.iter_chunks()) == chunks_before
    assert api.client.get("/api/v1/gc", headers=h).json()["pending_deletions"] == 1
    assert [i["id"] for i in api.client.get("/api/v1/apps/web/images", headers=h).json()] == [new]

    viewer = api.client.post("/api/v1/gc", headers=api.headers("viewer"))
    assert viewer.status_code == 403
    started = api.client.post("/api/v1/gc", headers=h)
    assert started.status_code == 202
    gc_job = started.json()["job"]
    assert gc_job["type"] == "gc"
    done = api.appliance.runner.wait(gc_job["id"], timeout=30)
    assert done.status.value == "succeeded", done.message
    assert f"{len(only_old)} chunk(s) removed" in done.message
    assert done.result is not None and done.result["chunks_removed"] == len(only_old)
    left = {c for c, _ in api.appliance.site.pool.iter_chunks()}
    assert not only_old & left and image_chunks(api, new) <= left
    state = api.client.get("/api/v1/gc", headers=h).json()
    assert state["pending_deletions"] == 0 and not state["unfinished"]
    assert api.client.get(f"/api/v1/images/{new}/verify", headers=h).json()["ok"]


def image_chunks(api: Api, image_id: str) -> set[bytes]:
    """The data chunk ids that image ``image_id``'s manifest names."""
    from tandem.catalog import queries as q
    from tandem.storage.manifest import load_manifest

    with api.appliance.catalog.begin() as session:
        manifest = q.get_image(session, image_id=image_id).manifest
    return load_manifest(api.appliance.site.pool, bytes.fromhex(manifest)).chunk_ids()


def age_chunks(api: Api) -> None:
    """Make every chunk an hour old: GC spares chunks younger than a running writer."""
    pool = api.appliance.site.pool
    age_pool(pool, 3600)


def test_verify_reports_a_damaged_image(api: Api, tmp_path: Path) -> None:
    seed_app(api.appliance)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(100_000))
    image = seed_image(api.appliance, "web", src)
    pool = api.appliance.site.pool
    chunks = list(pool.iter_chunks())  # all of them: a half-used scandir would stay open
    chunk = chunks[0][0]
    chunk_file(pool, chunk).unlink()
    report = api.client.get(f"/api/v1/images/{image}/verify", headers=api.headers("viewer")).json()
    assert report["ok"] is False and report["missing"] == [chunk.hex()]


def test_verify_as_a_job_reports_a_damaged_image_with_progress(api: Api, tmp_path: Path) -> None:
    """``POST /images/{id}/verify`` (``tandem image verify``): a job whose result is the
    report the synchronous call answers, its progress the image's size."""
    seed_app(api.appliance)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(100_000))
    image = seed_image(api.appliance, "web", src)
    chunk = next(iter(image_chunks(api, image)))
    chunk_file(api.appliance.site.pool, chunk).unlink()
    started = api.client.post(f"/api/v1/images/{image}/verify", headers=api.headers())
    assert started.status_code == 202, started.text
    job = started.json()["job"]
    assert (job["type"], job["app"], job["image"]) == ("verify-image", "web", image)
    api.appliance.runner.start()
    api.appliance.runner.wait(job["id"], timeout=60)
    job = api.client.get(f"/api/v1/jobs/{job['id']}", headers=api.headers()).json()
    assert job["status"] == "succeeded", job["message"]
    assert job["result"]["ok"] is False and job["result"]["missing"] == [chunk.hex()]
    assert job["bytes_done"] == job["bytes_total"] > 0
    viewer = api.client.post(f"/api/v1/images/{image}/verify", headers=api.headers("viewer"))
    assert viewer.status_code == 403  # a job is an operator's; a viewer asks GET .../verify


def test_metrics(api: Api, tmp_path: Path) -> None:
    seed_app(api.appliance)
    (tmp_path / "src").mkdir()
    seed_image(api.appliance, "web", tmp_path / "src")
    api.client.post("/api/v1/apps/web/capture", headers=api.headers())
    text = api.client.get("/metrics", headers=api.headers("viewer")).text
    assert 'tandem_jobs{status="queued"} 1.0' in text
    assert 'tandem_apps{state="managed"} 1.0' in text
    assert 'tandem_app_last_capture_timestamp_seconds{app="web"}' in text


def test_apps_protect_unprotect_and_remove(api: Api) -> None:
    seed_app(api.appliance, "web", managed=False)
    h = api.headers("operator")
    api.client.post(
        "/api/v1/templates", headers=h, json={"name": "gold", "every": "15m", "keep": 3}
    )
    app = api.client.post("/api/v1/apps/web/protect", headers=h, json={"template": "gold"}).json()
    assert (app["state"], app["template"]) == ("managed", "gold")
    for key in (
        "name",
        "kind",
        "host",
        "state",
        "template",
        "path",
        "epoch",
        "last_capture",
        "lag_seconds",
    ):
        assert key in app
    status, _, message = error(api.client.delete("/api/v1/apps/web", headers=h))
    assert status == 409 and "Unprotect it" in message
    status, _, message = error(api.client.delete("/api/v1/templates/gold", headers=h))
    assert status == 409 and "protects the applications web" in message
    assert api.client.post("/api/v1/apps/web/unprotect", headers=h).json()["template"] is None
    history = api.client.get("/api/v1/apps/web/transitions", headers=h).json()
    assert [(t["operation"], t["to_state"], t["actor"]) for t in history] == [
        ("protect", "managed", "operator"),
        ("unprotect", "unmanaged", "operator"),
    ]
    removed = api.client.delete("/api/v1/apps/web", headers=h).json()
    assert removed["deleted"] == "web"  # its host (none runs here) could not be asked:
    assert "by hand" in removed["note"]  # what it may have kept is named


def test_adding_an_unreachable_host_stores_nothing(api: Api) -> None:
    from tests.appliance.live import free_port

    url = f"https://127.0.0.1:{free_port()}"
    body = {"name": "far", "url": url, "token": "t", "fingerprint": "ab" * 32}
    status, code, message = error(
        api.client.post("/api/v1/hosts", headers=api.headers(), json=body)
    )
    assert (status, code) == (502, "Unreachable")
    assert message.startswith(f"host far unreachable at {url}: ")
    assert api.client.get("/api/v1/hosts", headers=api.headers()).json() == []


def test_an_admin_sets_an_apps_hooks_by_script_name(api: Api) -> None:
    seed_app(api.appliance)
    h = api.headers("admin")
    changed = api.client.patch("/api/v1/apps/web", headers=h, json={"stop": "web-stop"})
    assert changed.status_code == 200
    assert changed.json()["stop"] == "web-stop" and changed.json()["start"] is None
    both = api.client.patch(
        "/api/v1/apps/web", headers=h, json={"start": "web-start", "freeze": "web.freeze"}
    ).json()
    assert (both["start"], both["stop"], both["freeze"], both["thaw"]) == (
        "web-start",
        "web-stop",  # kept
        "web.freeze",
        None,
    )
    cleared = api.client.patch("/api/v1/apps/web", headers=h, json={"stop": ""}).json()
    assert cleared["stop"] is None and cleared["start"] == "web-start"
    shown = api.client.get("/api/v1/apps/web", headers=api.headers("viewer")).json()
    assert (shown["start"], shown["stop"], shown["freeze"]) == ("web-start", None, "web.freeze")
    status, _, message = error(api.client.patch("/api/v1/apps/web", headers=h, json={"x": 1}))
    assert status == 422 and "x" in message
    status, _, message = error(api.client.patch("/api/v1/apps/nope", headers=h, json={}))
    assert status == 404 and "nope" in message
    viewer = api.client.patch("/api/v1/apps/web", headers=api.headers("viewer"), json={})
    assert viewer.status_code == 403


@pytest.mark.parametrize(
    "script", ["systemctl stop web", "../x", "a/b", "/usr/bin/pg_ctl", "-rf", "x" * 129]
)
def test_a_hook_is_a_script_name_never_a_command(api: Api, script: str) -> None:
    seed_app(api.appliance)
    for method, path, body in (
        ("PATCH", "/api/v1/apps/web", {"stop": script}),
        ("POST", "/api/v1/apps", {"name": "n", "host": "h1", "kind": "volume", "path": "/d"}),
    ):
        body = {**body, "stop": script}
        status, code, message = error(
            api.client.request(method, path, headers=api.headers(), json=body)
        )
        assert (status, code) == (422, "InvalidInput") and "stop" in message, message
        if len(script) <= 128:
            assert f"stop: the script {script!r} is not a script name" in message
            assert "scripts/ folder" in message
    shown = api.client.get("/api/v1/apps/web", headers=api.headers()).json()
    assert shown["stop"] is None
    assert "n" not in {
        a["name"] for a in api.client.get("/api/v1/apps", headers=api.headers()).json()
    }


def test_the_operation_checks_hook_names_too(api: Api) -> None:
    seed_app(api.appliance)
    site = api.appliance.site
    with pytest.raises(InvalidInput, match=re.escape("--stop '../x' is not a script name")):
        apps.set_hooks(site, name="web", hooks={"stop": "../x"}, role=Role.ADMIN)
    with pytest.raises(InvalidInput, match="--start 'a b' is not a script name"):
        apps.add_app(
            site,
            name="n",
            host="h1",
            kind=AppKind.VOLUME,
            path="/d",
            hooks={"start": "a b"},
            role=Role.ADMIN,
        )
    assert apps.get_app(site, name="web").stop_hook is None
    # A caller that does not say who it is counts as an operator: no hooks.
    with pytest.raises(Forbidden, match="admin role"):
        apps.set_hooks(site, name="web", hooks={"stop": "web-stop"})


def test_only_an_admin_registers_or_changes_hooks_and_it_is_audited(api: Api) -> None:
    seed_app(api.appliance)
    op, admin = api.headers("operator"), api.headers("admin")
    refused = api.client.patch("/api/v1/apps/web", headers=op, json={"stop": "web-stop"})
    status, code, message = error(refused)
    assert (status, code) == (403, "Forbidden")
    assert "Role 'operator' may not register or change the hooks of application 'web'" in message
    assert "Use a token with the admin role" in message
    app = {"name": "db", "host": "h1", "kind": "filesystem", "path": "/srv/db"}
    status, code, message = error(
        api.client.post("/api/v1/apps", headers=op, json={**app, "start": "db-start"})
    )
    assert (status, code) == (403, "Forbidden") and "admin role" in message
    apps = {a["name"]: a for a in api.client.get("/api/v1/apps", headers=op).json()}
    assert set(apps) == {"web"} and apps["web"]["stop"] is None  # nothing changed

    # An operator still adds apps without hooks, and sends unchanged hooks back freely.
    assert api.client.post("/api/v1/apps", headers=op, json=app).status_code == 201
    assert (
        api.client.patch("/api/v1/apps/web", headers=admin, json={"stop": "web-stop"}).json()[
            "stop"
        ]
        == "web-stop"
    )
    same = api.client.patch("/api/v1/apps/web", headers=op, json={"stop": "web-stop"})
    assert same.status_code == 200
    removed = api.client.patch("/api/v1/apps/web", headers=op, json={"stop": ""})
    assert removed.status_code == 403  # removing a hook changes it too
    with api.appliance.catalog.read() as session:
        rows = [(r.actor, r.role, r.method, r.path, r.status) for r in q.list_audit(session)]
    assert rows == [
        ("operator", "operator", "PATCH", "/api/v1/apps/web", 403),
        ("operator", "operator", "PATCH", "/api/v1/apps/web", 200),
        ("admin", "admin", "PATCH", "/api/v1/apps/web", 200),
        ("operator", "operator", "POST", "/api/v1/apps", 201),
        ("operator", "operator", "POST", "/api/v1/apps", 403),
        ("operator", "operator", "PATCH", "/api/v1/apps/web", 403),
    ]


def test_a_job_filter_that_is_not_an_app_name_is_a_422_not_a_crash(api: Api) -> None:
    for bad in ("\x00", "\x00\u009d", "a/b"):
        answer = api.client.get("/api/v1/jobs", params={"app": bad}, headers=api.headers())
        assert answer.status_code == 422, bad


def test_list_routes_page_with_a_cursor_and_stay_plain_lists(api: Api, tmp_path: Path) -> None:
    for i in range(5):
        seed_app(api.appliance, f"app{i}")
    src = tmp_path / "src"
    src.mkdir()
    for _ in range(5):
        (src / "a").write_bytes(os.urandom(1000))
        seed_image(api.appliance, "app0", src)
    for i in range(5):
        assert api.client.post(f"/api/v1/apps/app{i}/capture", headers=api.headers()).is_success
    h = api.headers("viewer")

    everything = api.client.get("/api/v1/apps", headers=h)
    assert "x-next-cursor" not in everything.headers  # no limit: the whole list, as before
    names = [a["name"] for a in everything.json()]
    pages = []
    url = "/api/v1/apps?limit=2"
    while url:
        resp = api.client.get(url, headers=h)
        pages.append([a["name"] for a in resp.json()])
        link = resp.headers.get("link")
        url = link[1 : link.index(">")] if link else ""
        if link:
            assert resp.headers["x-next-cursor"] == pages[-1][-1]
    assert pages == [names[0:2], names[2:4], names[4:5]]

    images_all = [i["id"] for i in api.client.get("/api/v1/apps/app0/images", headers=h).json()]
    got: list[str] = []
    after = ""
    while True:
        resp = api.client.get(f"/api/v1/apps/app0/images?limit=2{after}", headers=h)
        got += [i["id"] for i in resp.json()]
        cursor = resp.headers.get("x-next-cursor")
        if not cursor:
            break
        after = f"&after={cursor}"
    assert got == images_all and len(got) == 5

    jobs_all = [j["id"] for j in api.client.get("/api/v1/jobs", headers=h).json()]
    first = api.client.get("/api/v1/jobs?limit=3", headers=h)
    second = api.client.get(
        f"/api/v1/jobs?limit=3&after={first.headers['x-next-cursor']}", headers=h
    )
    assert [j["id"] for j in first.json() + second.json()] == jobs_all
    assert "x-next-cursor" not in second.headers


def test_a_bad_page_request_says_what_to_fix(api: Api) -> None:
    seed_app(api.appliance)
    h = api.headers("viewer")
    status, _, message = error(api.client.get("/api/v1/jobs?after=job_aaaaaaaaaaaa", headers=h))
    assert status == 422 and "names no job" in message and "without `after`" in message
    status, _, message = error(
        api.client.get("/api/v1/apps/web/images?after=img_aaaaaaaaaaaa", headers=h)
    )
    assert status == 422 and "names no image of 'web'" in message
    for bad in ("/api/v1/apps?limit=0", "/api/v1/jobs?after=../x", "/api/v1/apps?after=%2Fetc"):
        assert api.client.get(bad, headers=h).status_code == 422
    status, _, message = error(
        api.client.patch("/api/v1/gc", headers=api.headers("operator"), json={"every_seconds": 5})
    )
    assert status == 422 and "every_seconds" in message
    assert api.client.get("/api/v1/gc", headers=h).json()["every_seconds"] == 86_400
    status, _, message = error(
        api.client.patch(
            "/api/v1/gc", headers=api.headers("operator"), json={"full_every_seconds": 60}
        )
    )
    assert status == 422 and "full_every_seconds" in message
    changed = api.client.patch(
        "/api/v1/gc", headers=api.headers("operator"), json={"full_every_seconds": 86_400}
    )
    assert changed.status_code == 200 and changed.json()["full_every_seconds"] == 86_400


def test_listing_apps_costs_the_same_queries_at_any_count(api: Api) -> None:
    from sqlalchemy import event

    engine = api.appliance.catalog.engine
    statements: list[str] = []

    def count(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        statements.append(statement)

    def queries_for_list() -> int:
        statements.clear()
        event.listen(engine, "before_cursor_execute", count)
        try:
            resp = api.client.get("/api/v1/apps", headers=api.headers("viewer"))
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert resp.status_code == 200
        return len(statements)

    seed_app(api.appliance, "a0")
    few = queries_for_list()
    for i in range(1, 25):
        seed_app(api.appliance, f"a{i}")
    with api.appliance.catalog.begin() as session:
        q.set_setting(session, key="failback_downtime:a3", value="2.5")
    assert queries_for_list() == few
    listed = api.client.get("/api/v1/apps", headers=api.headers("viewer")).json()
    assert {a["name"]: a["failback_downtime_seconds"] for a in listed}["a3"] == 2.5
