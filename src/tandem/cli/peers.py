"""`tandem peer …` (pairing with the other site) and `tandem replicate APP`."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from tandem.errors import RateInvalid
from tandem.transport.api import JobAnswer, PairIn, checked

from .common import APPLIANCE_FLAGS, AppName, Session, api_command, checked_app, job_command

peer_app = typer.Typer(no_args_is_help=True, help="Pair with the appliance at the other site.")

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_rate(text: str | None) -> int | None:
    """'50M' -> bytes per second (K, M, G are powers of 1024); None or '0' -> no cap."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?(?:/s)?\s*", text, re.IGNORECASE)
    if not m:
        raise RateInvalid(text=text)
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


@peer_app.command("add")
@api_command(flags=APPLIANCE_FLAGS)
def peer_add(
    s: Session,
    peer_url: Annotated[str, typer.Option("--url", help="The peer appliance's URL.")],
    peer_token: Annotated[str, typer.Option("--token", help="An admin token of the peer.")],
    peer_fingerprint: Annotated[
        str, typer.Option("--fingerprint", help="The peer's certificate SHA-256.")
    ],
    bandwidth: Annotated[
        str | None, typer.Option("--bandwidth", help="Cap replication at this rate (e.g. 50M).")
    ] = None,
) -> None:
    """Pair this appliance with the peer, in both directions.

    --url, --token and --fingerprint are the peer's (as its `tandem appliance init` printed
    them); this appliance comes from TANDEM_URL, TANDEM_TOKEN and TANDEM_FINGERPRINT.
    """
    body = checked(
        PairIn,
        url=peer_url,
        token=peer_token,
        fingerprint=peer_fingerprint,
        bandwidth=parse_rate(bandwidth),
    )
    doc = s.api.add_peer(body)
    s.show(doc, ("name", "url", "fingerprint"))


@peer_app.command("list")
@api_command
def peer_list(s: Session) -> None:
    """The paired peer."""
    s.table(s.api.peers(), ("name", "url", "fingerprint"))


@peer_app.command("remove")
@api_command
def peer_remove(s: Session, name: Annotated[str, typer.Argument(help="The peer's name.")]) -> None:
    """Unpair (replication to it stops; its replicas stay where they are)."""
    s.show(s.api.remove_peer(name), ("deleted",))


@job_command
def replicate(s: Session, app: AppName) -> JobAnswer:
    """Send APP's snapshots the peer lacks now (mirroring does this after each capture)."""
    return s.api.replicate(checked_app(app))
