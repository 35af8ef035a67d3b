"""Hosts: machines with a host agent, registered with this appliance.

Invariants
- A host is registered only after its agent answered ``/api/v1/info`` over TLS pinned to
  the given fingerprint and accepted the given token; otherwise nothing is stored and the
  error says why (``Unreachable``: "host NAME unreachable at URL: ...", a certificate
  mismatch, or a refused token).
- The agent token is stored as given (the appliance must present it); it is never returned
  by the API.
"""

from __future__ import annotations

from tandem.catalog import queries as q
from tandem.catalog.models import Host
from tandem.domain.ids import validate_name
from tandem.errors import AlreadyExists, NotFound
from tandem.operations.site import Site
from tandem.transport.agent import AgentClient
from tandem.transport.tls import normalize_fingerprint


def agent_for(host: Host) -> AgentClient:
    """A client for the agent of ``host`` (close it, or use it as a context manager)."""
    return AgentClient(host.name, host.url, host.token, host.fingerprint)


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


def remove_host(site: Site, *, name: str) -> None:
    with site.catalog.begin() as session:
        q.remove_host(session, name=name)
