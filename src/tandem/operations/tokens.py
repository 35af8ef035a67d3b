"""API tokens: made by an admin, shown once, stored only as their SHA-256.

Invariants
- A token's secret is returned by ``add_token`` and never again.
- The last admin token cannot be removed: the appliance would be left unmanageable.
"""

from __future__ import annotations

from sqlalchemy import func, select

from tandem.catalog import queries as q
from tandem.catalog.models import Token
from tandem.domain.rules import Role
from tandem.errors import LastAdminToken
from tandem.operations.site import Site
from tandem.transport.server import new_token


def add_token(site: Site, *, name: str, role: Role) -> tuple[Token, str]:
    """Create a token; returns its row and its secret (shown once)."""
    secret = new_token()
    with site.catalog.begin() as session:
        row = q.add_token(session, name=name, token=secret, role=role)
    return row, secret


def list_tokens(site: Site) -> list[Token]:
    with site.catalog.read() as session:
        return q.list_tokens(session)


def remove_token(site: Site, *, name: str) -> None:
    """Remove a token, unless it is the last admin token."""
    with site.catalog.begin() as session:
        rows = {row.name: row for row in q.list_tokens(session)}
        row = rows.get(name)
        if row is not None and row.role is Role.ADMIN:
            admins = session.scalar(
                select(func.count()).select_from(Token).where(Token.role == Role.ADMIN)
            )
            if (admins or 0) <= 1:
                raise LastAdminToken(name=name)
        q.remove_token(session, name=name)
