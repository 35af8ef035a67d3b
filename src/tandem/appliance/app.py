"""The appliance's HTTP API (FastAPI): routers, authentication, audit, metrics.

Layout
- ``/health``: liveness, no token.
- ``/openapi.json``, ``/docs``: the API's description, no token (it holds no data).
- ``/metrics``: Prometheus metrics, viewer token.
- ``/api/v1/...``: the REST API, bearer token and role per ``tandem.appliance.auth``; every
  state-changing call is audited (``tandem.appliance.audit``).
- ``/api/v1/sessions/{id}/...``: chunk transfers of a running job, authenticated by that
  session's own token.
- ``/``, ``/apps``, ``/monitor``, ``/jobs/...``, ``/sign-in``, ``/static``: the web console
  (``tandem.appliance.console``), with console sessions signed in from an API token.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tandem import __version__
from tandem.appliance import routes_ops, routes_peer, routes_sessions, routes_setup
from tandem.appliance.audit import AuditMiddleware
from tandem.appliance.auth import Caller, make_authorize
from tandem.appliance.console import install_console
from tandem.appliance.metrics import make_registry
from tandem.operations import monitor
from tandem.operations.site import Site
from tandem.transport.api import AuditOut, InfoOut
from tandem.transport.server import install_error_handlers

KIND = "appliance"


def create_app(site: Site) -> FastAPI:
    """The ASGI app of one appliance (the job runner and scheduler run beside it)."""
    app = FastAPI(
        title=f"tandem appliance {site.name}",
        version=__version__,
        description="Two-site disaster recovery: the API of one appliance.",
    )
    install_error_handlers(app)
    app.add_middleware(AuditMiddleware, catalog=site.catalog)
    authorize = make_authorize(site.catalog)
    registry = make_registry(site.catalog)

    @app.get("/health", tags=["meta"])
    def health() -> dict[str, str]:
        return {"status": "ok", "kind": KIND, "name": site.name, "version": __version__}

    @app.get("/metrics", tags=["meta"], dependencies=[Depends(authorize)])
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    api = APIRouter(prefix="/api/v1", dependencies=[Depends(authorize)])

    @api.get("/info", tags=["meta"])
    def info(who: Caller) -> InfoOut:
        return InfoOut(
            name=site.name,
            kind=KIND,
            version=__version__,
            url=site.url,
            fingerprint=site.fingerprint,
            you=who.name,
            role=who.role,
            runner=site.runner_id,
            scheduling=site.scheduling(),
        )

    @api.get("/audit", tags=["meta"])
    def audit(limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> list[AuditOut]:
        return [AuditOut.model_validate(row) for row in monitor.list_audit(site, limit=limit)]

    api.include_router(routes_setup.make_router(site))
    api.include_router(routes_ops.make_router(site))
    api.include_router(routes_peer.make_router(site))
    app.include_router(api)
    app.include_router(routes_sessions.make_router(site.sessions))
    install_console(app, site)
    return app
