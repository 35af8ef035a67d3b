"""Applications: what is protected, where it lives, and protection by a template.

Invariants
- An app's state changes only through ``record_transition`` (the lifecycle table), in the
  same transaction as the change it stands for (protect sets the template, unprotect
  clears it), so the state and the template never disagree.
- Paths are canonical (``domain.paths``); start/stop commands are shell commands run by
  the host's agent.
- No two apps of this site on one host overlap (equal, or one inside the other): restoring
  one would overwrite or delete the other's files. Mirror records (``origin`` set) are the
  other site's apps on its hosts and take no part.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from tandem.catalog import queries as q
from tandem.catalog.models import App, Transition
from tandem.domain.lifecycle import AppKind, Operation
from tandem.domain.paths import check_path, overlaps
from tandem.errors import Conflict, InvalidInput
from tandem.operations.site import Site

MAX_COMMAND = 4096


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
            raise Conflict(
                detail=f"{what} {path} on host {host} {how} application {other.name!r} "
                f"({other.path}); apps on one host must not overlap, or restoring one would "
                "overwrite the other's files. Choose a path outside it"
            )


def _check_command(command: str | None, what: str) -> str | None:
    if command is None or not command.strip():
        return None
    if "\x00" in command or len(command) > MAX_COMMAND:
        raise InvalidInput(
            detail=f"--{what} must be a shell command of at most {MAX_COMMAND} characters"
        )
    return command


def add_app(
    site: Site,
    *,
    name: str,
    host: str,
    kind: AppKind,
    path: str,
    start: str | None = None,
    stop: str | None = None,
) -> App:
    path = _check_path(path)
    with site.catalog.begin() as session:
        check_no_overlap(session, host=host, path=path)
        return q.add_app(
            session,
            name=name,
            kind=kind,
            host=host,
            path=path,
            start_cmd=_check_command(start, "start"),
            stop_cmd=_check_command(stop, "stop"),
        )


def set_commands(site: Site, *, name: str, commands: dict[str, str | None]) -> App:
    """Change the start and/or stop command of an app (a blank one removes it)."""
    checked = {k: _check_command(v, k) for k, v in commands.items() if k in ("start", "stop")}
    with site.catalog.begin() as session:
        return q.set_app_commands(session, name=name, commands=checked)


def list_apps(site: Site) -> list[App]:
    with site.catalog.read() as session:
        return q.list_apps(session)


def get_app(site: Site, *, name: str) -> App:
    with site.catalog.read() as session:
        return q.get_app(session, name=name)


def remove_app(site: Site, *, name: str) -> None:
    with site.catalog.begin() as session:
        q.remove_app(session, name=name)


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
