"""Who is calling, and may they: bearer tokens and roles.

Invariants
- Every route under ``/api/v1`` (but the transfer sessions, which have tokens of their own)
  depends on ``authorize``: no route can forget authentication.
- The role a call needs follows from the call itself, so the rule is stated once:
  tokens, peers and the audit trail need ``admin``; any other read (GET) needs ``viewer``;
  any other change needs ``operator``. Roles include the ones below them. The calls of the
  other site under ``/api/v1/peer/`` need the ``peer`` role, which allows nothing else; the
  routes then check the caller *is* the peer (``routes_peer.peer_caller``: an admin is not).
  One rule depends on the body, not the path: registering or changing an app's hooks (scripts
  its host runs as root) needs ``admin`` (``operations.apps.check_may_set_hooks``).
- The caller is left in ``request.state.principal`` for the audit trail and as the actor of
  the jobs it starts.
- Tokens are looked up by their SHA-256; the secret is never stored or logged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tandem.catalog import queries as q
from tandem.catalog.db import Catalog
from tandem.domain.rules import Role, role_allows
from tandem.errors import Forbidden, Unauthorized

ADMIN_PATHS = ("/api/v1/tokens", "/api/v1/peers", "/api/v1/audit")
PEER_PREFIX = "/api/v1/peer/"  # the calls the other site's appliance makes
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer = HTTPBearer(auto_error=False, description="An API token (`tandem token add`).")


@dataclass(frozen=True)
class Principal:
    """The caller: the token's name and role."""

    name: str
    role: Role


def needed_role(method: str, path: str) -> Role:
    """The least role that may make this call."""
    if path.startswith(PEER_PREFIX):
        return Role.PEER
    if any(path == p or path.startswith(p + "/") for p in ADMIN_PATHS):
        return Role.ADMIN
    if method.upper() in READ_METHODS:
        return Role.VIEWER
    return Role.OPERATOR


def make_authorize(catalog: Catalog) -> Callable[..., Principal]:
    """The dependency that authenticates the bearer token and checks the role."""

    def authorize(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        if credentials is None or not credentials.credentials:
            raise Unauthorized("No API token was sent. Pass a token with --token or TANDEM_TOKEN.")
        with catalog.read() as session:
            row = q.find_token(session, token=credentials.credentials)
        if row is None:
            raise Unauthorized(
                "The API token is wrong: this appliance does not know it. Pass a valid token "
                "with --token or TANDEM_TOKEN."
            )
        principal = Principal(name=row.name, role=row.role)
        request.state.principal = principal
        needed = needed_role(request.method, request.url.path)
        if not role_allows(principal.role, needed):
            raise Forbidden(
                role=principal.role.value,
                action=f"{request.method} {request.url.path}",
                needed=needed.value,
            )
        return principal

    return authorize


def caller(request: Request) -> Principal:
    """The authenticated caller (``authorize`` ran before any route)."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise Unauthorized()
    return principal


Caller = Annotated[Principal, Depends(caller)]
