"""`tandem peer …` (pairing with the other site) and `tandem replicate APP`."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from tandem.errors import InvalidInput

from .common import (
    ApplianceFingerprint,
    ApplianceToken,
    ApplianceUrl,
    Fingerprint,
    Json,
    NoWait,
    Token,
    Url,
    connect,
)
from .jobs import follow_job
from .output import handle_errors
from .setup import _show, _table

peer_app = typer.Typer(no_args_is_help=True, help="Pair with the appliance at the other site.")

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_rate(text: str | None) -> int | None:
    """'50M' -> bytes per second (K, M, G are powers of 1024); None or '0' -> no cap."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?(?:/s)?\s*", text, re.IGNORECASE)
    if not m:
        raise InvalidInput(detail=f"--bandwidth takes a rate like 50M or 800K, got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


@peer_app.command("add")
@handle_errors
def peer_add(
    peer_url: Annotated[str, typer.Option("--url", help="The peer appliance's URL.")],
    peer_token: Annotated[str, typer.Option("--token", help="An admin token of the peer.")],
    peer_fingerprint: Annotated[
        str, typer.Option("--fingerprint", help="The peer's certificate SHA-256.")
    ],
    bandwidth: Annotated[
        str | None, typer.Option("--bandwidth", help="Cap replication at this rate (e.g. 50M).")
    ] = None,
    url: ApplianceUrl = None,
    token: ApplianceToken = None,
    fingerprint: ApplianceFingerprint = None,
    json_: Json = False,
) -> None:
    """Pair this appliance with the peer, in both directions.

    --url, --token and --fingerprint are the peer's (as its `tandem appliance init` printed
    them); this appliance comes from TANDEM_URL, TANDEM_TOKEN and TANDEM_FINGERPRINT.
    """
    body = {
        "url": peer_url,
        "token": peer_token,
        "fingerprint": peer_fingerprint,
        "bandwidth": parse_rate(bandwidth),
    }
    with connect(url, token, fingerprint) as client:
        _show(client.post("/api/v1/peers", body), json_, ("name", "url", "fingerprint"))


@peer_app.command("list")
@handle_errors
def peer_list(
    url: Url = None, token: Token = None, fingerprint: Fingerprint = None, json_: Json = False
) -> None:
    """The paired peer."""
    with connect(url, token, fingerprint) as client:
        _table(client.get("/api/v1/peers"), ("name", "url", "fingerprint"), json_)


@peer_app.command("remove")
@handle_errors
def peer_remove(
    name: Annotated[str, typer.Argument(help="The peer's name.")],
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Unpair (replication to it stops; its replicas stay where they are)."""
    with connect(url, token, fingerprint) as client:
        _show(client.delete(f"/api/v1/peers/{name}"), json_, ("deleted",))


@handle_errors
def replicate(
    app: Annotated[str, typer.Argument(help="The application.", metavar="APP")],
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Send APP's snapshots the peer lacks now (mirroring does this after each capture)."""
    with connect(url, token, fingerprint) as client:
        answer = client.post(f"/api/v1/apps/{app}/replicate", {})
        follow_job(client, answer["job"], json_=json_, no_wait=no_wait)
