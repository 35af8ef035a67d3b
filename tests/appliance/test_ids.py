"""Ids are ids: a value pasted where an image or job id goes names that kind of thing or
nothing, never another resource; the server checks the shape, every client quotes it, and
the CLI says "no such image" in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tandem.catalog import queries as q
from tandem.cli.common import job_of
from tandem.errors import InvalidInput, NotFound, RemoteError
from tandem.transport.client import ApiClient, api_path, quote_segment
from tests.appliance.conftest import Api, seed_app, seed_image
from tests.e2e.conftest import Cli


def apps_and_jobs(api: Api) -> tuple[list[str], list[str]]:
    with api.appliance.catalog.read() as session:
        return [a.name for a in q.list_apps(session)], [j.type for j in q.list_jobs(session)]


@pytest.mark.parametrize(
    "raw",
    [
        "web",  # an app's name is not an image id
        "%2E%2E",  # ".." arriving as one segment
        "img_AAAAAAAAAAAA",
        "img_aaaaaaaaaaaa%0A",
    ],
)
def test_the_server_answers_a_malformed_image_id_with_422(api: Api, raw: str) -> None:
    seed_app(api.appliance)
    for method in ("GET", "DELETE"):
        answer = api.client.request(method, f"/api/v1/images/{raw}", headers=api.headers())
        assert answer.status_code == 422, (method, raw, answer.text)
        assert answer.json()["error"] == "InvalidInput"
        assert "image_id" in answer.json()["message"]
    for path in (f"/api/v1/jobs/{raw}", f"/api/v1/jobs/{raw}/log"):
        answer = api.client.get(path, headers=api.headers())
        assert answer.status_code == 422 and "job_id" in answer.json()["message"], path
    assert apps_and_jobs(api) == (["web"], [])


def test_an_escaped_slash_names_no_route(api: Api) -> None:
    seed_app(api.appliance)
    answer = api.client.delete("/api/v1/images/..%2Fapps%2Fweb", headers=api.headers())
    assert answer.status_code == 404 and "no API path" in answer.json()["message"]
    assert apps_and_jobs(api) == (["web"], [])


def test_a_name_path_parameter_is_checked_too(api: Api) -> None:
    seed_app(api.appliance)
    for path in ("/api/v1/apps/%2E%2E", "/api/v1/apps/-web", "/api/v1/hosts/a%20b"):
        answer = api.client.delete(path, headers=api.headers())
        assert answer.status_code == 422 and "name" in answer.json()["message"], path
    assert apps_and_jobs(api) == (["web"], [])


def test_quoting_keeps_a_value_in_its_own_segment() -> None:
    assert quote_segment("../apps/web") == "..%2Fapps%2Fweb"
    assert quote_segment("..") == "%2E%2E" and quote_segment(".") == "%2E"
    assert quote_segment("a b?c#d") == "a%20b%3Fc%23d"
    assert api_path("/api/v1/images/", "img_x", "verify") == "/api/v1/images/img_x/verify"


def client_of(api: Api, token: str = "admin") -> ApiClient:
    site = api.appliance.site
    return ApiClient(site.url, api.tokens[token], site.fingerprint)


def test_the_client_never_sends_a_dot_segment(api: Api) -> None:
    seed_app(api.appliance)
    with client_of(api) as client:
        with pytest.raises(InvalidInput, match=re.escape("'.' or '..' segments")):
            client.delete("/api/v1/images/../apps/web")  # would be DELETE /api/v1/apps/web
        with pytest.raises(NotFound, match="no API path"):
            client.delete(api_path("/api/v1/images", "../apps/web"))  # quoted: one segment
        with pytest.raises(InvalidInput, match="image_id"):
            client.delete(api_path("/api/v1/images", ".."))
    assert apps_and_jobs(api) == (["web"], [])


def test_the_cli_says_no_such_image_and_deletes_nothing(api: Api, tmp_path: Path) -> None:
    """The reproduction of issue #12: `tandem image delete ../apps/X` deleted app X, then
    printed `internal error: KeyError: 'job'`."""
    seed_app(api.appliance)
    seed_app(api.appliance, "X", managed=False)  # nothing guards it but the id check
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("hello")
    image = seed_image(api.appliance, "web", source)
    site = api.appliance.site
    cli = Cli(site.url, api.tokens["admin"], site.fingerprint)
    for argv, says in [
        (("image", "delete", "../apps/X"), "error: image '../apps/X' does not exist."),
        (("image", "show", "../apps/web"), "error: image '../apps/web' does not exist."),
        (("mount", "..", "--host", "h1"), "error: image '..' does not exist."),
        (("job", "cancel", "../apps/web"), "error: job '../apps/web' does not exist."),
        (("capture", "../web"), "error: application '../web' does not exist."),
        (("restore", "web/../web", "--image", image), "error: application 'web/../web' does"),
    ]:
        result = cli.run(*argv, check=False, json_=False)
        assert result.code == 1, (argv, result.stderr)
        assert result.error.startswith(says), (argv, result.error)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "internal error" not in result.stderr and result.stdout == ""
    assert apps_and_jobs(api) == (["X", "web"], [])
    with api.appliance.catalog.read() as session:
        assert q.get_image(session, image_id=image)  # still there
        assert q.list_audit(session) == []  # nothing was even sent


def test_an_unexpected_answer_is_a_clear_error_not_a_crash(api: Api) -> None:
    with client_of(api) as client, pytest.raises(RemoteError) as info:
        job_of(client, {"deleted": "web"})
    assert info.value.message.startswith(
        f"appliance {api.appliance.site.url} answered with an error: it answered "
        "{'deleted': 'web'} where a job was expected"
    )
    assert info.value.exit_code == 1


def test_the_cli_refuses_the_restore_warnings_out_of_order(api: Api, tmp_path: Path) -> None:
    seed_app(api.appliance)
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("hello")
    image = seed_image(api.appliance, "web", source)
    site = api.appliance.site
    cli = Cli(site.url, api.tokens["operator"], site.fingerprint)
    reversed_ = ("--confirm", "OVERWRITE OTHER APPS", "--confirm", "DATA LOSS")
    result = cli.run("restore", "web", "--image", image, *reversed_, check=False, json_=False)
    assert result.code == 1 and result.stdout == ""
    assert result.error == (
        "error: The typed confirmations answer warnings given one after the other: type "
        '"DATA LOSS", then "OVERWRITE OTHER APPS", in this order. Repeat the request with '
        '--confirm "DATA LOSS" --confirm "OVERWRITE OTHER APPS".'
    )
    with api.appliance.catalog.read() as session:
        assert q.list_audit(session) == [] and q.list_jobs(session) == []  # nothing sent
