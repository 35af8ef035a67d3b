"""Hosts: machines with a host agent, registered with this appliance.

Invariants
- A host is registered only after its agent answered ``/api/v1/info`` over TLS pinned to
  the given fingerprint and accepted the given token; otherwise nothing is stored and the
  error says why (``Unreachable``: "host NAME unreachable at URL: ...", a certificate
  mismatch, or a refused token).
- The agent token is stored as given (the appliance must present it); it is never returned
  by the API.
- An operation acts on an app's own host (capture, restore, its start/stop) only through
  ``app_host``: a mirror record's host and path are the other site's word, shown and never
  acted on, so such an operation is refused there with what to do instead.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.orm import Session

from tandem.catalog import queries as q
from tandem.catalog.models import App, Host
from tandem.domain.ids import validate_name
from tandem.errors import AlreadyExists, MirrorRecord, NotFound, TandemError
from tandem.operations.site import Site
from tandem.transport.agent import AgentClient
from tandem.transport.tls import normalize_fingerprint


def agent_for(host: Host) -> AgentClient:
    """A client for the agent of ``host`` (close it, or use it as a context manager)."""
    return AgentClient(host.name, host.url, host.token, host.fingerprint)


def mirror_fix(app: App, action: str) -> str:
    """What to do instead of acting on a mirror record's (production's) host."""
    if action in ("restore", "capture", "start", "stop"):
        return (
            f"Run the {action} at production ({app.origin}); to run the app at this site, "
            f"fail it over to one of this site's hosts (`tandem failover {app.name} --host HOST "
            "--mount-point DIR --confirm FAILOVER`)"
        )
    return f"Give one of this site's hosts and a --mount-point for {app.name!r}"


def check_own_location(app: App, action: str) -> None:
    """Refuse ``action`` on ``app``'s host or path when they are not this site's (a mirror
    record: the peer named them)."""
    if app.origin is not None:
        raise MirrorRecord(
            app=app.name, origin=app.origin, action=action, fix=mirror_fix(app, action)
        )


def app_host(session: Session, app: App, *, action: str) -> Host:
    """The host of this site that ``app`` runs on, for an operation that acts on it there."""
    check_own_location(app, action)
    return q.get_host(session, name=app.host)


def add_host(site: Site, *, name: str, url: str, token: str, fingerprint: str) -> Host:
    """Register a host after checking that its agent answers."""
    validate_name(name, "host name")
    fingerprint = normalize_fingerprint(fingerprint)
    with site.catalog.read() as session:
        try:
            q.get_host(session, name=name)
        except NotFound:
            pass
        else:
            raise AlreadyExists(what="host", name=name)
    probe = Host(name=name, url=url.rstrip("/"), token=token, fingerprint=fingerprint)
    with agent_for(probe) as agent:
        agent.info()
    with site.catalog.begin() as session:
        return q.add_host(session, name=name, url=probe.url, token=token, fingerprint=fingerprint)


def list_hosts(site: Site) -> list[Host]:
    with site.catalog.read() as session:
        return q.list_hosts(session)


def get_host(site: Site, *, name: str) -> Host:
    with site.catalog.read() as session:
        return q.get_host(session, name=name)


_EXPORT_SECRET = re.compile(r"^([^\s/.]+)\.[A-Za-z0-9_-]{16,128}$")


def list_vms(site: Site, *, name: str) -> list[dict[str, Any]]:
    """The libvirt domains of hypervisor host ``name`` (its agent says NotHypervisor if it
    is not one). A disk on an NBD export (a VM tandem defined over a presented image) shows
    the export's name with its secret blanked: the list is data any viewer reads, the
    secret a capability to read and write the copy."""
    host = get_host(site, name=name)
    with agent_for(host) as agent:
        domains = agent.vms()
    for domain in domains:
        for disk in domain.get("disks") or []:
            if isinstance(disk, dict) and disk.get("type") == "network":
                disk["source"] = _EXPORT_SECRET.sub(
                    r"\1.(secret hidden)", str(disk.get("source", ""))
                )
    return domains


def power_states(site: Site, vm_apps: list[App]) -> dict[str, list[tuple[str, str]]]:
    """The power state of each vm app's domains that run on this site's hosts, for the App
    Manager: ``{app: [("DOMAIN on HOST", "running"|"shut off"|…)]}``: its production domain
    when its host is registered here, and the new VMs its presented images were defined as.
    Each host is asked once; one that does not answer says so instead of a state."""
    wanted: dict[str, list[tuple[str, str]]] = {}
    with site.catalog.read() as session:
        registered = {h.name: h for h in q.list_hosts(session)}
        for app in vm_apps:
            pairs = [(app.host, app.path)] if app.host in registered else []
            for image in q.list_images(session, app=app.name):
                if image.vm_name and image.mounted_host:
                    for where in (image.mounted_host, *(image.vm_hosts or [])):
                        pairs.append((where, image.vm_name))
            wanted[app.name] = [(h, d) for h, d in pairs if h in registered]
    states: dict[str, dict[str, str] | str] = {}
    for host in {h for pairs in wanted.values() for h, _ in pairs}:
        try:
            with agent_for(registered[host]) as agent:
                states[host] = {str(d.get("name")): str(d.get("state")) for d in agent.vms()}
        except TandemError as exc:
            states[host] = f"unknown: {exc.message}"
    out: dict[str, list[tuple[str, str]]] = {}
    for app_name, pairs in wanted.items():
        rows = []
        for host, domain in pairs:
            known = states[host]
            state = known if isinstance(known, str) else known.get(domain, "not defined")
            rows.append((f"{domain} on {host}", state))
        out[app_name] = rows
    return out


def remove_host(site: Site, *, name: str) -> None:
    with site.catalog.begin() as session:
        q.remove_host(session, name=name)
