"""A busy app does not silently fall behind: when the achieved RPO passes the template's
``--max-lag`` the app is *at risk* in the API (what ``tandem apps`` shows), the console and
``/metrics``. The clock is set by recording images with old ``created`` times, never by
sleeping."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from tandem.appliance.documents import app_out
from tandem.catalog import queries as q
from tandem.domain.consistency import Cut
from tandem.domain.images import ImageKind
from tandem.domain.lifecycle import AppKind, Operation
from tandem.operations.apps import risk_of
from tests.appliance.conftest import Api
from tests.appliance.test_console import client_for, sign_in, text_of


def template(api: Api, name: str, **body: Any) -> dict[str, Any]:
    answer = api.client.post(
        "/api/v1/templates", headers=api.headers("operator"), json={"name": name, **body}
    )
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def protected(api: Api, app: str, tmpl: str) -> None:
    """``app`` on a host (not contacted), protected by ``tmpl``."""
    with api.appliance.catalog.begin() as session:
        if not q.list_hosts(session):
            q.add_host(
                session, name="h1", url="https://127.0.0.1:1", token="t", fingerprint="00" * 32
            )
        q.add_app(session, name=app, kind=AppKind.FILESYSTEM, host="h1", path="/srv/" + app)
        q.record_transition(session, app=app, operation=Operation.PROTECT, actor="test")
        q.set_app_template(session, name=app, template=tmpl)


def snapshot_aged(api: Api, app: str, age: timedelta, cut: str | None = None) -> str:
    """Record a snapshot of ``app`` taken ``age`` ago (moves its last capture)."""
    with api.appliance.catalog.begin() as session:
        image = q.add_image(
            session,
            app=app,
            kind=ImageKind.SNAPSHOT,
            manifest="ab" * 32,
            size=0,
            created=datetime.now(UTC) - age,
            consistency=cut,
        )
    return image.id


def app_doc(api: Api, name: str) -> dict[str, Any]:
    rows = api.client.get("/api/v1/apps", headers=api.headers("viewer")).json()
    (row,) = [r for r in rows if r["name"] == name]
    shown = api.client.get(f"/api/v1/apps/{name}", headers=api.headers("viewer")).json()
    assert (shown["at_risk"], shown["max_lag_seconds"]) == (row["at_risk"], row["max_lag_seconds"])
    return dict(row)


def test_template_max_lag_is_parsed_shown_and_bad_values_change_nothing(api: Api) -> None:
    doc = template(api, "gold", every="5m", max_lag="15m")
    assert (doc["max_lag"], doc["max_lag_seconds"]) == ("15m", 900)
    listed = api.client.get("/api/v1/templates", headers=api.headers("viewer")).json()
    assert [(t["name"], t["max_lag"]) for t in listed] == [("gold", "15m")]
    assert template(api, "plain", every="1h")["max_lag"] is None
    for bad in ("soon", "0s", "400d"):
        answer = api.client.post(
            "/api/v1/templates",
            headers=api.headers("operator"),
            json={"name": "bad", "every": "1h", "max_lag": bad},
        )
        assert answer.status_code == 422, answer.text
        assert "--max-lag" in answer.json()["message"]
    names = [t["name"] for t in api.client.get("/api/v1/templates", headers=api.headers()).json()]
    assert names == ["gold", "plain"]


def test_an_app_is_at_risk_when_its_newest_capture_is_older_than_max_lag(api: Api) -> None:
    template(api, "gold", every="5m", max_lag="15m")
    protected(api, "web", "gold")
    # Never captured, protected just now: not at risk yet.
    row = app_doc(api, "web")
    assert (row["at_risk"], row["rpo_seconds"], row["max_lag_seconds"]) == (False, None, 900)

    snapshot_aged(api, "web", timedelta(minutes=20))
    row = app_doc(api, "web")
    assert row["at_risk"] is True
    assert 1200 <= row["rpo_seconds"] < 1300
    assert row["lag_seconds"] == row["rpo_seconds"]

    snapshot_aged(api, "web", timedelta(minutes=10))  # a newer capture within the limit
    row = app_doc(api, "web")
    assert row["at_risk"] is False and 600 <= row["rpo_seconds"] < 700


def test_an_rpo_just_past_the_limit_is_never_shown_at_the_limit(api: Api) -> None:
    """Ages are shown to the millisecond, rounded up: an app at risk by 0.4 ms shows an
    RPO above its limit, never equal to it (nor an age below what it is)."""
    template(api, "tight", max_lag="1s")
    protected(api, "edge", "tight")
    with api.appliance.catalog.read() as session:
        app = q.get_app(session, name="edge")
        tmpl = q.get_template(session, name="tight")
    now = datetime.now(UTC)
    captured = now - timedelta(seconds=1, microseconds=400)
    app.last_capture = captured
    risk = risk_of(app, tmpl, now)
    assert risk.at_risk
    shown = app_out(app, now, risk=risk)
    assert shown.rpo_seconds is not None and shown.max_lag_seconds == 1
    assert shown.rpo_seconds > shown.max_lag_seconds
    assert shown.lag_seconds == shown.rpo_seconds == 1.001


def test_a_template_without_max_lag_never_puts_an_app_at_risk(api: Api) -> None:
    template(api, "plain", every="5m")
    protected(api, "web", "plain")
    snapshot_aged(api, "web", timedelta(days=30))
    row = app_doc(api, "web")
    assert (row["at_risk"], row["max_lag_seconds"]) == (False, None)
    assert row["rpo_seconds"] >= 30 * 86400


def test_a_mirrored_app_is_judged_on_its_newest_replica_at_the_peer(api: Api) -> None:
    template(api, "mirrored", every="5m", max_lag="15m", mirror=True)
    protected(api, "db", "mirrored")
    snapshot_aged(api, "db", timedelta(minutes=1))  # fresh here, but never reached the peer
    with api.appliance.catalog.begin() as session:
        q.mark_replicated(session, name="db", at=datetime.now(UTC) - timedelta(hours=2))
    row = app_doc(api, "db")
    assert row["at_risk"] is True and row["rpo_seconds"] >= 7200
    assert row["lag_seconds"] < 120  # the local capture alone would have looked fine
    with api.appliance.catalog.begin() as session:
        q.mark_replicated(session, name="db", at=datetime.now(UTC) - timedelta(minutes=1))
    assert app_doc(api, "db")["at_risk"] is False


def metric(text: str, name: str, app: str) -> float | None:
    found = re.search(rf'^{name}{{app="{app}"}} (\S+)$', text, re.M)
    return None if found is None else float(found.group(1))


def test_metrics_expose_the_rpo_and_the_at_risk_flag(api: Api) -> None:
    template(api, "gold", every="5m", max_lag="15m")
    protected(api, "late", "gold")
    protected(api, "fresh", "gold")
    snapshot_aged(api, "late", timedelta(hours=1))
    snapshot_aged(api, "fresh", timedelta(minutes=1))
    text = api.client.get("/metrics", headers=api.headers("viewer")).text
    assert "# TYPE tandem_app_rpo_seconds gauge" in text
    assert "# TYPE tandem_app_at_risk gauge" in text
    assert metric(text, "tandem_app_at_risk", "late") == 1.0
    assert metric(text, "tandem_app_at_risk", "fresh") == 0.0
    late = metric(text, "tandem_app_rpo_seconds", "late")
    assert late is not None and 3600 <= late < 3700
    fresh = metric(text, "tandem_app_rpo_seconds", "fresh")
    assert fresh is not None and fresh < 120


def test_the_console_shows_an_at_risk_badge_with_text(api: Api) -> None:
    template(api, "gold", every="5m", max_lag="15m")
    protected(api, "late", "gold")
    protected(api, "fresh", "gold")
    snapshot_aged(api, "late", timedelta(hours=1))
    snapshot_aged(api, "fresh", timedelta(minutes=1))
    with client_for(api) as c:
        sign_in(c, api.tokens["viewer"])
        page = c.get("/apps")
        assert page.status_code == 200
        rows = {
            m.group(1): text_of(m.group(2))
            for m in re.finditer(r'<tr data-app="([^"]+)">(.*?)</tr>', page.text, re.S)
        }
        assert "At risk" in rows["late"] and "badge-at-risk" in page.text
        assert "At risk" not in rows["fresh"] and "Within 15" in rows["fresh"]
        access = c.get("/apps/late")
        assert access.status_code == 200
        assert 'id="app-at-risk"' in access.text
        assert "At risk" in text_of(access.text)
        assert 'id="app-at-risk"' not in c.get("/apps/fresh").text


def test_the_console_shows_where_an_app_is_failed_over_and_each_images_cut(api: Api) -> None:
    template(api, "gold", every="5m")
    protected(api, "web", "gold")
    snapshot_aged(api, "web", timedelta(minutes=1), cut=Cut.REFLINK.value)
    with api.appliance.catalog.begin() as session:
        q.add_peer(
            session, name="site-b", url="https://127.0.0.1:2", token="t", fingerprint="00" * 32
        )
        q.get_app(session, name="web").peer_active = True
    with client_for(api) as c:
        sign_in(c, api.tokens["viewer"])
        row = re.search(r'<tr data-app="web">(.*?)</tr>', c.get("/apps").text, re.S)
        assert row is not None and "failed over at site-b" in text_of(row.group(1))
        access = c.get("/apps/web")
        assert "failed over at site-b" in text_of(access.text)
        cut = re.search(r'id="image-consistency">([^<]*)<', access.text)
        assert cut is not None and cut.group(1) == "reflink"
    doc = app_doc(api, "web")
    assert (doc["peer_active"], doc["failed_over_at"]) == (True, "site-b")


def test_protecting_an_app_answers_with_its_risk(api: Api) -> None:
    template(api, "gold", every="5m", max_lag="15m")
    protected(api, "web", "gold")
    snapshot_aged(api, "web", timedelta(hours=1))
    template(api, "lenient", every="5m", max_lag="1d")
    h = api.headers("operator")
    strict = api.client.post("/api/v1/apps/web/protect", headers=h, json={"template": "gold"})
    assert (strict.json()["at_risk"], strict.json()["max_lag_seconds"]) == (True, 900)
    lenient = api.client.post("/api/v1/apps/web/protect", headers=h, json={"template": "lenient"})
    assert (lenient.json()["at_risk"], lenient.json()["max_lag_seconds"]) == (False, 86400)
    gone = api.client.post("/api/v1/apps/web/unprotect", headers=h).json()
    assert (gone["at_risk"], gone["max_lag_seconds"]) == (False, None)
