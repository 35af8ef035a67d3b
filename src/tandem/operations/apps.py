"""Applications: what is protected, where it lives, and protection by a template.

Invariants
- An app's state changes only through ``record_transition`` (the lifecycle table), in the
  same transaction as the change it stands for (protect sets the template, unprotect
  clears it), so the state and the template never disagree.
- Paths are canonical (``domain.paths``).
- No two apps of this site on one host overlap (equal, or one inside the other): restoring
  one would overwrite or delete the other's files. Mirror records (``origin`` set) are the
  other site's apps on its hosts and take no part.
- Hooks (``start``, ``stop``, ``freeze``, ``thaw``) are names of scripts
  in the host agent's ``scripts/`` folder (``tandem.domain.hooks``), never command lines.
- Hooks run as root on the host, so registering or changing them is an admin act: an app
  added with hooks, or a change of a hook's script, needs the admin role (``check_may_set_hooks``,
  the one place this rule lives); the audit trail records the call like any other change.
- An app is *at risk* (``risk_of``) when its template has a ``max_lag`` and the achieved RPO
  exceeds it: the age of its newest snapshot here or, for a mirrored template, of its newest
  replica at the peer as this site knows it (``last_replicated``); with none yet, the age of
  the app itself. An app failed over at the peer (``peer_active``) is not judged: the peer's
  copy is the writer and mirroring is stopped on purpose until the failback.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from tandem.catalog import queries as q
from tandem.catalog.models import App, Template, Transition
from tandem.domain.consistency import ConsistencyMode
from tandem.domain.hooks import Hook, check_hook_name
from tandem.domain.ids import validate_name
from tandem.domain.lifecycle import AppKind, Operation
from tandem.domain.paths import check_path, overlaps
from tandem.domain.rules import Role, role_allows
from tandem.domain.vms import check_domain_name
from tandem.errors import (
    AppLocationInvalid,
    ChoiceInvalid,
    Forbidden,
    PathsOverlap,
    TandemError,
)
from tandem.operations import wal
from tandem.operations.hosts import agent_for
from tandem.operations.site import Site


def _check_path(path: str) -> str:
    return check_path(path, "--path")


def check_no_overlap(
    session: Session, *, host: str, path: str, exclude: str | None = None, what: str = "--path"
) -> None:
    """Refuse ``path`` on ``host`` when it equals, contains or lies inside the path of
    another app of this site on that host (``exclude``: the app being changed)."""
    for other in q.list_local_apps_on_host(session, host=host):
        if other.name != exclude and overlaps(path, other.path):
            how = (
                "is the path of"
                if path == other.path
                else "lies inside the path of"
                if path.startswith(other.path + "/")
                else "contains the path of"
            )
            raise PathsOverlap(
                what=what, path=path, host=host, how=how, other=other.name, other_path=other.path
            )


def _check_hooks(hooks: Mapping[str, str | None]) -> dict[str, str | None]:
    """The hooks given, each a script name or ``None`` (an empty name removes the hook)."""
    checked: dict[str, str | None] = {}
    for hook, script in hooks.items():
        if hook not in {h.value for h in Hook}:
            raise ChoiceInvalid(what="hook", value=hook, choices="start, stop, freeze, thaw")
        checked[hook] = check_hook_name(script, f"--{hook}") if script else None
    return checked


def check_may_set_hooks(role: Role, app: str) -> None:
    """Hooks run as root on the host: only an admin registers or changes them."""
    if not role_allows(role, Role.ADMIN):
        raise Forbidden(
            role=role.value,
            action=f"register or change the hooks of application {app!r} (they run as root "
            "on its host)",
            needed=Role.ADMIN.value,
        )


def app_path(kind: AppKind, *, path: str | None, domain: str | None) -> str:
    """What an app's ``path`` holds: its canonical path, or for a vm app its domain name."""
    if kind is AppKind.VM:
        if not domain or path:
            raise AppLocationInvalid(
                kind="vm",
                needs="--domain (its libvirt domain)",
                unused="--path",
                other="filesystem, volume and postgresql",
                hint="; list the host's domains with `tandem vms --host HOST`",
            )
        return check_domain_name(domain)
    if domain or not path:
        raise AppLocationInvalid(
            kind=kind.value, needs="--path", unused="--domain", other="vm", hint=" (a full path)"
        )
    return path


def add_app(
    site: Site,
    *,
    name: str,
    host: str,
    kind: AppKind,
    path: str,
    hooks: Mapping[str, str | None] | None = None,
    role: Role = Role.OPERATOR,
    consistency: ConsistencyMode = ConsistencyMode.AUTO,
) -> App:
    path = check_domain_name(path) if kind is AppKind.VM else _check_path(path)
    """Add an app. ``role`` is the caller's; left out, the caller is taken for an operator,
    who may not give hooks."""
    checked = _check_hooks(hooks or {})
    if any(checked.values()):
        check_may_set_hooks(role, name)
    if kind is AppKind.POSTGRESQL:
        validate_name(name, "application name")
        with site.catalog.read() as session:
            check_no_overlap(session, host=host, path=path)
            row = q.get_host(session, name=host)
        with agent_for(row) as agent:
            agent.pg_probe(name, path)  # refuses a cluster that cannot be protected
    with site.catalog.begin() as session:
        check_no_overlap(session, host=host, path=path)
        return q.add_app(
            session,
            name=name,
            kind=kind,
            host=host,
            path=path,
            hooks=checked,
            consistency=ConsistencyMode(consistency).value,
        )


def set_hooks(
    site: Site,
    *,
    name: str,
    hooks: Mapping[str, str | None],
    role: Role = Role.OPERATOR,
    consistency: ConsistencyMode | None = None,
) -> App:
    """Change some of an app's hook scripts (an empty name removes one; the rest stay);
    ``role`` as for ``add_app``. ``consistency``, when given, sets what its captures may be
    cut from."""
    checked = _check_hooks(hooks)
    with site.catalog.begin() as session:
        current = q.app_hooks(q.get_app(session, name=name, for_update=True))
        if any(current[hook] != script for hook, script in checked.items()):
            check_may_set_hooks(role, name)
        if consistency is not None:
            q.set_app_consistency(
                session, name=name, consistency=ConsistencyMode(consistency).value
            )
        return q.set_app_hooks(session, name=name, hooks=checked)


def list_apps(site: Site, *, after: str | None = None, limit: int | None = None) -> list[App]:
    """Apps by name; ``after`` (a name) and ``limit`` make a page."""
    with site.catalog.read() as session:
        return q.list_apps(session, after=after, limit=limit)


def get_app(site: Site, *, name: str) -> App:
    with site.catalog.read() as session:
        return q.get_app(session, name=name)


def remove_app(site: Site, *, name: str) -> str | None:
    """Remove an app; for a PostgreSQL app of this site, its WAL receiver is stopped and its
    replication slot dropped first (a slot left behind would make the server keep WAL
    forever), and the WAL held here goes with it. The snapshot or clones its host keeps
    beside a tree for the next capture (``agent.pit``) are removed too; returns why they
    could not be (the host unreachable: the removal goes on), else None."""
    with site.catalog.read() as session:
        row = q.get_app(session, name=name)
        q.remove_app_check(session, app=row)
        host = q.get_host(session, name=row.host) if row.origin is None else None
    if row.kind is AppKind.POSTGRESQL:
        with site.wal_lock:  # the shipper restarts no receiver behind this drop
            if host is not None:
                with agent_for(host) as agent:
                    agent.pg_drop(row.name, row.path)
            wal.forget(site, row)
    left = None
    if host is not None and row.kind in (AppKind.FILESYSTEM, AppKind.POSTGRESQL):
        try:
            with agent_for(host) as agent:
                agent.drop_kept(row.path)
        except TandemError as exc:
            left = (
                f"any copies kept beside {row.path} on host {host.name} for faster captures "
                f"could not be removed ({exc.message}); remove the .tandem-pit-keep-* folders "
                "beside it (inside it, if it is a whole file system) by hand"
            )
    with site.catalog.begin() as session:
        q.remove_app(session, name=name)
    return left


def protect_app(site: Site, *, name: str, template: str, actor: str | None) -> App:
    """Apply a template: the app becomes (or stays) managed under it."""
    with site.catalog.begin() as session:
        q.get_template(session, name=template)
        q.record_transition(session, app=name, operation=Operation.PROTECT, actor=actor)
        return q.set_app_template(session, name=name, template=template)


def unprotect_app(site: Site, *, name: str, actor: str | None) -> App:
    """Stop protecting an app: no more scheduled captures; its images stay."""
    with site.catalog.begin() as session:
        q.record_transition(session, app=name, operation=Operation.UNPROTECT, actor=actor)
        return q.set_app_template(session, name=name, template=None)


def list_transitions(site: Site, *, name: str) -> list[Transition]:
    with site.catalog.read() as session:
        return q.list_transitions(session, app=name)


@dataclass(frozen=True)
class Risk:
    """What ``apps`` shows about an app's recovery point against its template's limit."""

    rpo_seconds: float | None
    """Age of the recovery point the risk is judged on (None: none yet)."""
    max_lag_seconds: int | None
    at_risk: bool
    failed_over_at: str | None = None
    """The peer's name, for an app of this site failed over at the peer."""


def risk_of(
    app: App,
    template: Template | None,
    now: datetime,
    peer: str | None = None,
    wal_point: datetime | None = None,
) -> Risk:
    """The achieved RPO of ``app`` (protected by ``template``) at ``now``, and whether it
    passes the template's ``max_lag``. ``wal_point``: for a PostgreSQL app, the newest
    moment its WAL is held (at the peer, for a mirroring template), a later recovery point
    than its newest base image."""
    failed_over_at = (peer or "the peer") if app.peer_active else None
    if template is None or app.origin is not None:
        return Risk(None, None, False, failed_over_at)
    point = app.last_replicated if template.mirror else app.last_capture
    if point is not None and wal_point is not None:
        point = max(point, wal_point)
    rpo = None if point is None else max(0.0, (now - point).total_seconds())
    limit = template.max_lag_seconds
    if limit is None or app.peer_active:
        return Risk(rpo, limit, False, failed_over_at)
    age = rpo if rpo is not None else max(0.0, (now - app.created).total_seconds())
    return Risk(rpo, limit, age > limit, failed_over_at)


def risks(site: Site, rows: Iterable[App], now: datetime | None = None) -> dict[str, Risk]:
    """``risk_of`` each app of ``rows``, by name (a fixed number of queries, however many)."""
    now = now or datetime.now(UTC)
    rows = list(rows)
    with site.catalog.read() as session:
        templates = {t.name: t for t in q.list_templates(session)}
        peers = q.list_peers(session)
        points = wal_points(session, rows, templates)
    peer = peers[0].name if peers else None
    return {
        a.name: risk_of(a, templates.get(a.template or ""), now, peer, points.get(a.name))
        for a in rows
    }


def wal_points(
    session: Session, rows: Iterable[App], templates: Mapping[str, Template]
) -> dict[str, datetime]:
    """For each PostgreSQL app of this site among ``rows``, by name, the newest moment its
    WAL is held (by the peer, when its template mirrors); an app holding none is left out.
    One query for the mirrored apps and one for the others, never one per app."""
    pg = [a for a in rows if a.kind is AppKind.POSTGRESQL and a.origin is None]
    points: dict[str, datetime] = {}
    for mirrored in (False, True):
        group = [a for a in pg if _mirrors(templates.get(a.template or "")) is mirrored]
        if group:
            held = q.wal_held_until(session, app_ids=[a.id for a in group], mirrored=mirrored)
            points.update({a.name: held[a.id] for a in group if a.id in held})
    return points


def _mirrors(template: Template | None) -> bool:
    return bool(template and template.mirror)
