"""The web console over real HTTPS, without a browser: sessions, roles, CSRF, typed
confirmations checked by the server, and what the pages show. (The browser tests, which
click through the pages in Chromium, are in tests/e2e/test_console_browser.py.)"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from tandem.appliance.console import (
    COOKIE,
    ConsoleSessions,
    FormField,
    form_fields,
    image_actions,
)
from tandem.catalog import queries as q
from tandem.catalog.models import App, Image
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.lifecycle import AppKind, AppState
from tandem.domain.rules import Role
from tandem.operations import tokens
from tests.appliance.conftest import Api, pinned, seed_app, seed_image


def client_for(api: Api) -> httpx.Client:
    """A fresh browser-like client (its own cookie jar) on the appliance."""
    appliance = api.appliance
    return httpx.Client(
        base_url=appliance.site.url, verify=pinned(appliance.directory), timeout=120.0
    )


def sign_in(client: httpx.Client, token: str, next_url: str = "/apps") -> httpx.Response:
    return client.post("/sign-in", data={"token": token, "next": next_url})


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def text_of(html: str) -> str:
    """What a reader sees: the page without tags, blanks collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split()).replace(" )", ")")


def hello_image(api: Api, tmp_path: Path) -> str:
    """The app ``web`` with one image of a file ``a.txt`` (``hello``)."""
    seed_app(api.appliance)
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("hello")
    return seed_image(api.appliance, "web", source)


def jobs(api: Api) -> list[tuple[str, str | None]]:
    with api.appliance.catalog.read() as session:
        return [(j.type, j.app) for j in q.list_jobs(session)]


def test_pages_need_a_session_and_sign_in_returns_to_them(api: Api) -> None:
    seed_app(api.appliance)
    with client_for(api) as c:
        for path in ("/", "/apps", "/apps/web", "/monitor", "/apps/web/report"):
            answer = c.get(path)
            assert answer.status_code == 303, path
            assert answer.headers["location"].startswith("/sign-in?next="), path
        assert c.get("/sign-in").status_code == 200
        signed = sign_in(c, api.tokens["viewer"], "/apps/web")
        assert signed.status_code == 303
        assert signed.headers["location"] == "/apps/web"
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=strict" in cookie
        page = c.get("/apps/web")
        assert page.status_code == 200
        assert "viewer (viewer)" in text_of(page.text)


def test_wrong_token_and_peer_token_are_refused_at_sign_in(api: Api) -> None:
    _, peer_token = tokens.add_token(api.appliance.site, name="dr", role=Role.PEER)
    with client_for(api) as c:
        for token in ("not-a-token", peer_token, ""):
            answer = sign_in(c, token)
            assert answer.status_code == 401
            assert "That token is wrong" in answer.text
            assert COOKIE not in c.cookies


def test_open_redirects_are_not_followed(api: Api) -> None:
    with client_for(api) as c:
        for target in ("//evil.example/x", "https://evil.example/", "\\\\evil"):
            assert sign_in(c, api.tokens["viewer"], target).headers["location"] == "/apps"


def test_expired_forged_or_revoked_sessions_return_to_sign_in(api: Api) -> None:
    site = api.appliance.site
    seed_app(api.appliance)
    expired = ConsoleSessions(site, lifetime=-10).sign_in(api.tokens["operator"])
    assert expired is not None
    with client_for(api) as c:
        c.cookies.set(COOKIE, expired[0], domain="127.0.0.1")
        answer = c.get("/apps")
        assert answer.status_code == 303
        assert "expired" in c.get(answer.headers["location"]).text
    live = ConsoleSessions(site).sign_in(api.tokens["viewer"])
    assert live is not None
    with client_for(api) as c:
        c.cookies.set(COOKIE, live[0][:-1] + "x", domain="127.0.0.1")
        assert c.get("/apps").status_code == 303  # a made-up session is no session
    with client_for(api) as c:
        sign_in(c, api.tokens["viewer"])
        assert c.get("/apps").status_code == 200
        tokens.remove_token(site, name="viewer")
        answer = c.get("/apps")
        assert answer.status_code == 303
        assert "deleted" in c.get(answer.headers["location"]).text


def test_a_signed_out_session_is_refused_when_replayed(api: Api) -> None:
    seed_app(api.appliance)
    with client_for(api) as c:
        sign_in(c, api.tokens["operator"])
        page = c.get("/apps/web")
        assert page.status_code == 200
        cookie, csrf = c.cookies[COOKIE], csrf_of(page)
        out = c.post("/sign-out", data={"csrf": csrf})
        assert out.status_code == 303 and out.headers["location"] == "/sign-in"
    with client_for(api) as thief:  # someone kept the cookie: it is dead on the server
        thief.cookies.set(COOKIE, cookie, domain="127.0.0.1")
        answer = thief.get("/apps/web")
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/sign-in?")
        assert "Your session has ended" in thief.get(answer.headers["location"]).text
        refused = thief.post("/apps/web/actions/capture", data={"csrf": csrf})
        assert refused.status_code == 303
    assert jobs(api) == []
    with api.appliance.catalog.read() as session:
        audited = [(r.actor, r.path, r.status) for r in q.list_audit(session)]
    assert ("operator", "/sign-out", 303) in audited


def test_expired_sessions_are_purged_at_sign_in(api: Api) -> None:
    site = api.appliance.site

    def stored(cookie: str) -> bool:
        with api.appliance.catalog.read() as session:
            return q.find_console_session(session, session_id=cookie) is not None

    live = ConsoleSessions(site).sign_in(api.tokens["viewer"])
    expired = ConsoleSessions(site, lifetime=-10).sign_in(api.tokens["viewer"])
    assert live and expired and stored(live[0]) and stored(expired[0])
    again = ConsoleSessions(site).sign_in(api.tokens["operator"])
    assert again and stored(again[0]) and stored(live[0])
    assert not stored(expired[0])  # gone at the next sign-in


def test_app_manager_lists_apps_with_their_state_and_links(api: Api) -> None:
    seed_app(api.appliance, "web")
    seed_app(api.appliance, "db", managed=False)
    with client_for(api) as c:
        sign_in(c, api.tokens["viewer"])
        page = c.get("/apps").text
    assert 'href="/apps/web"' in page and 'href="/apps/db"' in page
    row = page[page.index('data-app="web"') :].split("</tr>")[0]
    assert "managed" in row and "daily" in row and "filesystem" in row and "h1" in row


def test_viewer_cannot_act_and_forms_need_the_csrf_token(api: Api, tmp_path: Path) -> None:
    seed_app(api.appliance)
    with client_for(api) as c:
        sign_in(c, api.tokens["viewer"])
        page = c.get("/apps/web")
        assert "Capture now" not in page.text
        answer = c.post("/apps/web/actions/capture", data={"csrf": csrf_of(page)})
        assert answer.status_code == 403
        assert "role viewer" in answer.text and "operator" in answer.text
    with client_for(api) as c:
        sign_in(c, api.tokens["operator"])
        assert c.post("/apps/web/actions/capture", data={}).status_code == 403
        assert "CSRF" in c.post("/apps/web/actions/capture", data={"csrf": "0" * 32}).text
        assert jobs(api) == []
        page = c.get("/apps/web")
        answer = c.post("/apps/web/actions/capture", data={"csrf": csrf_of(page), "label": "x"})
        assert answer.status_code == 303
        assert re.fullmatch(r"/jobs/[\w-]+\?app=web", answer.headers["location"])
    assert jobs(api) == [("capture", "web")]
    with api.appliance.catalog.read() as session:
        audited = [(r.actor, r.path, r.status) for r in q.list_audit(session)]
    assert ("operator", "/apps/web/actions/capture", 303) in audited
    assert ("viewer", "/apps/web/actions/capture", 403) in audited


def test_forged_confirmations_are_refused_by_the_server(api: Api, tmp_path: Path) -> None:
    image = hello_image(api, tmp_path)
    with client_for(api) as c:
        sign_in(c, api.tokens["operator"])
        csrf = csrf_of(c.get("/apps/web"))
        forged = [
            ("failover", {"host": "h1", "confirm": "failover"}, "FAILOVER"),
            ("restore", {"image": image}, "DATA LOSS"),
            ("restore", {"image": image, "confirm": "DATA LOSS", "confirm2": "x"}, "OVERWRITE"),
            (
                "restore",
                {"image": image, "confirm": "OVERWRITE OTHER APPS", "confirm2": "DATA LOSS"},
                '"DATA LOSS", then "OVERWRITE OTHER APPS", in this order',
            ),
        ]
        for action, data, named in forged:
            answer = c.post(f"/apps/web/actions/{action}", data={"csrf": csrf, **data})
            assert answer.status_code == 422, (action, data)
            assert named in html.unescape(answer.text)
            assert 'role="alert"' in answer.text  # shown on the Access page, form kept
    assert jobs(api) == []


def test_restore_asks_for_the_second_warning_only_after_the_first(api: Api, tmp_path: Path) -> None:
    # SPEC §4.4: "DATA LOSS" and then "OVERWRITE OTHER APPS"; the page works without script.
    image = hello_image(api, tmp_path)
    with client_for(api) as c:
        sign_in(c, api.tokens["operator"])
        first = c.get(f"/apps/web?image={image}")
        form = first.text[first.text.index('id="op-restore"') :].split("</form>")[0]
        assert 'name="confirm"' in form and 'data-confirm="DATA LOSS"' in form
        assert "confirm2" not in form and "OVERWRITE OTHER APPS" not in form
        assert ">Continue</button>" in form
        csrf = csrf_of(first)
        wrong = c.post(
            "/apps/web/actions/restore", data={"csrf": csrf, "image": image, "confirm": "data"}
        )
        assert wrong.status_code == 422 and 'id="rs-confirm2"' not in wrong.text
        second = c.post(
            "/apps/web/actions/restore",
            data={"csrf": csrf, "image": image, "confirm": "DATA LOSS"},
        )
        assert second.status_code == 200
        form = second.text[second.text.index('id="op-restore"') :].split("</form>")[0]
        assert 'id="op-restore" open' in second.text
        assert '<input type="hidden" name="confirm" value="DATA LOSS">' in form
        assert 'data-confirm="OVERWRITE OTHER APPS"' in form and 'id="rs-confirm"' not in form
        assert ">Restore to production</button>" in form
    assert jobs(api) == []  # accepting the first warning starts nothing


def test_access_page_shows_the_timeline_newest_first(api: Api, tmp_path: Path) -> None:
    seed_app(api.appliance)
    source = tmp_path / "src"
    source.mkdir()
    ids = []
    for n in range(3):
        (source / "f").write_text(str(n))
        ids.append(seed_image(api.appliance, "web", source))
    with client_for(api) as c:
        sign_in(c, api.tokens["operator"])
        page = c.get("/apps/web").text
        shown = re.findall(r'data-image="([^"]+)" data-kind="snapshot"', page)
        assert shown == ids[::-1]
        assert f'class="kind-snapshot selected" data-image="{ids[-1]}"' in page  # newest chosen
        chosen = c.get(f"/apps/web?image={ids[0]}").text
        assert f'snapshot <span class="mono">{ids[0]}</span>' in chosen
        assert 'id="op-restore"' in chosen and 'id="op-mount"' in chosen
        assert 'id="op-failover"' not in chosen  # a snapshot is not failed over to
        assert c.get("/apps/nope").status_code == 404


def test_job_page_returns_to_the_timeline_when_the_job_succeeded(api: Api) -> None:
    seed_app(api.appliance)
    from tandem.domain.jobs import JobStatus
    from tandem.jobs.queue import submit_job

    with api.appliance.catalog.begin() as session:
        job = submit_job(session, type="capture", app="web", actor="test")
        job_id = job.id
    with client_for(api) as c:
        sign_in(c, api.tokens["viewer"])
        page = c.get(f"/jobs/{job_id}?app=web")
        assert page.status_code == 200 and "queued" in page.text
        assert 'http-equiv="refresh"' in page.text  # refreshes itself without JavaScript
        assert c.get(f"/jobs/{job_id}/status").json()["active"] is True
        with api.appliance.catalog.begin() as session:
            row = q.get_job(session, job_id=job_id)
            row.status = JobStatus.SUCCEEDED
            row.message = "captured"
        back = c.get(f"/jobs/{job_id}?app=web")
        assert back.status_code == 303
        assert back.headers["location"].startswith(f"/apps/web?done={job_id}")
        assert "captured" in c.get(back.headers["location"]).text
        monitor = c.get("/monitor").text
        assert f'data-job="{job_id}" data-status="succeeded"' in monitor
        assert c.get("/monitor/rows?status=failed").text.strip().endswith("</tr>")
        assert job_id not in c.get("/monitor/rows?status=failed").text
        odd = c.get("/monitor", params={"app": "\x00odd"})  # not a name: no rows, no crash
        assert odd.status_code == 200 and "No jobs." in odd.text


def image_of(kind: ImageKind, state: ImageState = ImageState.READY) -> Image:
    return Image(id="i1", kind=kind, state=state)


@pytest.mark.parametrize(
    ("app_state", "kind", "image_state", "production", "expected"),
    [
        (
            AppState.MANAGED,
            ImageKind.REPLICA,
            ImageState.READY,
            False,
            ["test-failover", "failover", "mount", "clone", "delete", "verify"],
        ),
        (
            AppState.MANAGED,
            ImageKind.SNAPSHOT,
            ImageState.READY,
            True,
            ["restore", "mount", "clone", "delete", "verify"],
        ),
        (
            AppState.FAILED_OVER,
            ImageKind.FAILOVER,
            ImageState.MOUNTED,
            False,
            ["syncback", "failback", "failback-replica", "verify"],
        ),
        (
            AppState.FAILED_OVER,
            ImageKind.SYNCBACK,
            ImageState.READY,
            True,
            ["restore", "mount", "clone", "delete", "verify"],
        ),
        (
            AppState.FAILBACK_PENDING,
            ImageKind.PROTECTIVE,
            ImageState.READY,
            False,
            ["mount", "commit-failback", "undo-failback", "verify"],
        ),
        (
            AppState.MANAGED,
            ImageKind.TEST_FAILOVER,
            ImageState.MOUNTED,
            False,
            ["unmount", "verify"],
        ),
        (AppState.MANAGED, ImageKind.TEST_FAILOVER, ImageState.READY, False, ["delete", "verify"]),
        (AppState.MANAGED, ImageKind.SNAPSHOT, ImageState.DELETING, True, []),
    ],
)
def test_operations_offered_follow_the_lifecycle(
    app_state: AppState,
    kind: ImageKind,
    image_state: ImageState,
    production: bool,
    expected: list[str],
) -> None:
    app = App(name="web", kind=AppKind.FILESYSTEM, state=app_state)
    offered = image_actions(app, image_of(kind, image_state), production=production)
    assert [a.name for a in offered] == expected


def test_a_failed_over_vm_fails_back_onto_a_domain_with_a_pool_for_a_new_one(
    api: Api, tmp_path: Path
) -> None:
    seed_app(api.appliance)
    source = tmp_path / "src"
    source.mkdir()
    image = seed_image(api.appliance, "web", source)
    with api.appliance.catalog.begin() as session:
        row = q.get_app(session, name="web")
        row.kind, row.path, row.state = AppKind.VM, "web-vm", AppState.FAILED_OVER
        found = q.get_image(session, image_id=image)
        found.kind, found.state = ImageKind.FAILOVER, ImageState.MOUNTED
    with client_for(api) as c:
        sign_in(c, api.tokens["operator"])
        page = c.get(f"/apps/web?image={image}").text
        assert 'id="op-failback-replica"' in page
        assert "Domain (restored / new target)" in page
        assert 'name="pool"' in page  # the storage pool of a new domain at production


def test_a_bad_form_value_gets_the_apis_own_message(api: Api, tmp_path: Path) -> None:
    """The console validates a form with the request model of the API's call for the same
    operation (operations.registry): the same refusal, the same words, no job."""
    seed_app(api.appliance)
    source = tmp_path / "src"
    source.mkdir()
    image = seed_image(api.appliance, "web", source)
    cases = [
        ("test-failover", "/apps/web/test-failover", {"host": "h1", "shutdown_timeout": "soon"}),
        ("clone", f"/images/{image}/clone", {"host": "h1", "path": ""}),
        ("failover", "/apps/web/failover", {"host": "h1", "label": "x" * 129}),
    ]
    with client_for(api) as c:
        sign_in(c, api.tokens["operator"])
        csrf = csrf_of(c.get(f"/apps/web?image={image}"))
        for action, path, fields in cases:
            by_api = api.client.post(f"/api/v1{path}", json=fields, headers=api.headers("operator"))
            assert by_api.status_code == 422, by_api.text
            said = by_api.json()["message"]
            assert said.startswith("Invalid input: ") and list(fields)[-1] in said
            form = {"csrf": csrf, "image": image, **fields}
            by_console = c.post(f"/apps/web/actions/{action}", data=form)
            assert by_console.status_code == 422, action
            shown = re.search(
                r'<p class="error" role="alert" id="error">(.*?)</p>', by_console.text
            )
            assert shown is not None and html.unescape(shown.group(1)) == said
    assert jobs(api) == []


def test_verify_is_offered_on_an_image_and_runs_as_a_job(api: Api, tmp_path: Path) -> None:
    """An operation without a hand-written block on the Access page (``verify``) gets its
    form from the registry and runs like any other: its job, then the Monitor's page."""
    image = hello_image(api, tmp_path)
    with client_for(api) as c:
        sign_in(c, api.tokens["operator"])
        page = c.get(f"/apps/web?image={image}")
        form = page.text[page.text.index('id="op-verify"') :].split("</form>")[0]
        assert ">Verify</button>" in form and 'action="/apps/web/actions/verify"' in form
        answer = c.post("/apps/web/actions/verify", data={"csrf": csrf_of(page), "image": image})
        assert answer.status_code == 303 and answer.headers["location"].startswith("/jobs/job_")
    assert jobs(api) == [("verify-image", "web")]


def test_a_request_model_becomes_a_form() -> None:
    """What the console makes of a request model with no hand-written form."""

    class Asked(BaseModel):
        host: str = Field(title="Host to use", description="a DR host")
        deep: bool = False
        mode: Literal["fast", "slow"] | None = None
        rounds: int | None = None

    fields = {f.name: f for f in form_fields(Asked)}
    assert fields["host"] == FormField("host", "Host to use", "text", True, (), "a DR host")
    assert fields["deep"].kind == "checkbox" and fields["deep"].label == "Deep"
    assert fields["mode"].kind == "select" and fields["mode"].options == ("fast", "slow")
    assert fields["rounds"].kind == "number" and not fields["rounds"].required
    assert form_fields(None) == ()
