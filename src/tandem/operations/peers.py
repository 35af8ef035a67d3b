"""Pairing with the appliance at the other site.

Pairing, run on appliance A with a token of appliance B that has the admin role:
1. A reaches B over TLS pinned to B's fingerprint and reads its name (``/api/v1/info``).
2. A makes a new random token with the ``peer`` role for B and sends it, with A's own URL,
   name and certificate fingerprint, to B (``POST /api/v1/peers/accept``).
3. B stores A as its peer (pinning A's fingerprint), makes a ``peer`` token for A and
   answers it; A stores B as its peer.

Invariants
- A site has at most one peer (two-site DR); pairing again with the same peer replaces its
  tokens and fingerprint (after a re-initialised peer), pairing with another is refused.
- Peer tokens can only make the calls of ``transport.peer`` (``Role.PEER``): the other site
  is a peer, not an admin; the admin token given to ``peer add`` is used once and never
  stored.
- Every call to the peer pins its fingerprint: a peer whose certificate changed is refused
  (CertificateMismatch) until it is paired again.
"""

from __future__ import annotations

import json
from typing import Any

from tandem.catalog import queries as q
from tandem.catalog.models import App, Peer
from tandem.domain.ids import validate_name
from tandem.domain.rules import Role
from tandem.errors import (
    AlreadyPaired,
    NotFound,
    NotPaired,
    PairedWithItself,
    PeerRefused,
    TandemError,
)
from tandem.operations.site import Site
from tandem.transport.api import AcceptIn, checked
from tandem.transport.client import ApiClient, ApplianceClient
from tandem.transport.peer import PeerClient
from tandem.transport.server import new_token
from tandem.transport.tls import forget_pins, normalize_fingerprint

BANDWIDTH_KEY = "peer_bandwidth"


def peer_token_name(peer: str) -> str:
    return f"peer-{peer}"[:64]


def client_for(peer: Peer) -> PeerClient:
    """The typed client of the peer API (``transport.peer``): the only calls made to it."""
    return PeerClient(
        ApiClient(peer.url, peer.token, peer.fingerprint, what="peer", name=peer.name)
    )


def check_paired(site: Site, *, peer: str) -> None:
    """Refuse (``NotPaired``) a peer token whose appliance is not the one paired here (one
    made by hand, say): only the paired peer makes the peer calls."""
    paired = the_peer(site)
    if paired is None or paired.name != peer:
        raise NotPaired(peer=peer, token=peer_token_name(peer))


def the_peer(site: Site) -> Peer | None:
    with site.catalog.read() as session:
        peers = q.list_peers(session)
    return peers[0] if peers else None


def require_peer(site: Site) -> Peer:
    peer = the_peer(site)
    if peer is None:
        raise NotFound(what="peer", name="(none)", listing="peers")
    return peer


def _store(site: Site, *, name: str, url: str, fingerprint: str, token: str, mine: str) -> None:
    """Store ``name`` as this site's peer, called with ``token`` (replacing an earlier
    pairing with it), and ``mine`` as the token it calls us with."""
    validate_name(name, "appliance name")
    if name == site.name:
        raise PairedWithItself(url=url, name=name)
    with site.catalog.begin() as session:
        for other in q.list_peers(session):
            if other.name != name:
                raise AlreadyPaired(peer=other.name)
            q.remove_peer(session, name=name)
        for row in q.list_tokens(session):
            if row.name == peer_token_name(name):
                q.remove_token(session, name=row.name)
        q.add_peer(
            session,
            name=name,
            url=url.rstrip("/"),
            token=token,
            fingerprint=normalize_fingerprint(fingerprint),
        )
        q.add_token(session, name=peer_token_name(name), token=mine, role=Role.PEER)
    forget_pins()


def pair(
    site: Site, *, url: str, token: str, fingerprint: str, bandwidth: int | None = None
) -> Peer:
    """Pair this appliance with the one at ``url`` in both directions (run on either site)."""
    with ApplianceClient(url, token, fingerprint, what="peer") as remote:
        info = remote.info()
        name = info.name
        if name == site.name:
            raise PairedWithItself(url=url, name=name)
        # We make the token the peer will call us with; it answers the one we call it with.
        mine = new_token()
        answer = remote.accept_peer(
            checked(
                AcceptIn, name=site.name, url=site.url, fingerprint=site.fingerprint, token=mine
            )
        )
        _store(
            site,
            name=name,
            url=url,
            fingerprint=fingerprint,
            token=str(answer["token"]),
            mine=mine,
        )
    with site.catalog.begin() as session:
        q.set_setting(session, key=BANDWIDTH_KEY, value=str(bandwidth or 0))
        return q.get_peer(session, name=name)


def accept(site: Site, *, name: str, url: str, fingerprint: str, token: str) -> dict[str, Any]:
    """The other side of ``pair``: store the caller as our peer; answer its token."""
    mine = new_token()
    _store(site, name=name, url=url, fingerprint=fingerprint, token=token, mine=mine)
    return {"name": site.name, "token": mine}


def list_peers(site: Site) -> list[Peer]:
    with site.catalog.read() as session:
        return q.list_peers(session)


def remove_peer(site: Site, *, name: str) -> None:
    with site.catalog.begin() as session:
        q.remove_peer(session, name=name)
        for row in q.list_tokens(session):
            if row.name == peer_token_name(name):
                q.remove_token(session, name=row.name)


def bandwidth(site: Site) -> int:
    """Bytes per second replication may use (0: unlimited)."""
    with site.catalog.read() as session:
        value = q.get_setting(session, key=BANDWIDTH_KEY)
    return int(value or 0)


# --- which of this site's apps the peer's calls reach -----------------------------------


def is_mirrored(session: Any, app: App) -> bool:
    """Whether this site mirrors ``app`` to its peer (its template says ``mirror``)."""
    template = q.get_template(session, name=app.template) if app.template else None
    return bool(template and template.mirror)


def mirrored_app(session: Any, *, peer: str, app: str, action: str) -> App:
    """One of this site's own apps that it mirrors to ``peer`` (row locked): the only apps
    a peer's call about this site's apps (failed over, syncback, failback steps, restored)
    may reach. Anything else is refused before the call changes or reads anything."""
    row = q.get_app(session, name=app, for_update=True)
    if row.origin is not None:
        raise PeerRefused(
            peer=peer,
            action=action,
            app=app,
            reason=f"it is a mirror of {row.origin!r} here, not an app of this site",
            fix="Such calls go to the appliance the app came from",
        )
    if not is_mirrored(session, row):
        raise PeerRefused(
            peer=peer,
            action=action,
            app=app,
            reason=f"this site does not mirror it to {peer}",
            fix=f"Protect it here with a mirroring template (`tandem template add T --mirror`, "
            f"`tandem app protect {app} --template T`) if the peer is to hold and run it",
        )
    return row


# --- what this site agreed to on a peer's request -----------------------------------------

AGREEMENT_KEY = "failback:{app_id}"
"""A replica-style failback of one of this site's apps that the peer asked for and this site
agreed to (``replica_failback.production_failback_check``): JSON with the target, its
location (from this site's own catalog), the placeholder app registered there, and, once
the app took the target's identity, the location it had before (for an undo)."""


def agreement(session: Any, *, app_id: str) -> dict[str, Any] | None:
    value = q.get_setting(session, key=AGREEMENT_KEY.format(app_id=app_id))
    return json.loads(value) if value else None


def set_agreement(session: Any, *, app_id: str, doc: dict[str, Any] | None) -> None:
    q.set_setting(
        session, key=AGREEMENT_KEY.format(app_id=app_id), value=json.dumps(doc) if doc else ""
    )


def tell_failed_over(site: Site, *, app: str, epoch: int) -> str | None:
    """Tell production that ``app`` failed over here (best effort: it also learns it when a
    replication is refused as stale); returns why it could not be told, if it was not."""
    peer = the_peer(site)
    if peer is None:
        return "no peer is paired"
    try:
        with client_for(peer) as remote:
            remote.failed_over(app, epoch)
    except TandemError as exc:
        return exc.message
    return None
