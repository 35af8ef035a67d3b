"""Set-up routes: tokens, hosts, templates and applications. Thin: parse, call, render."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status

from tandem.appliance import documents
from tandem.appliance.auth import Caller
from tandem.appliance.paging import Limit, fetch, page
from tandem.appliance.params import Name
from tandem.catalog.models import App, Template
from tandem.domain.ids import NAME_PATTERN
from tandem.operations import apps, failback, hosts, templates, tokens
from tandem.operations.site import Site
from tandem.transport.api import (
    AppHooksIn,
    AppIn,
    AppOut,
    Deleted,
    HostIn,
    HostOut,
    ProtectIn,
    TemplateIn,
    TemplateOut,
    TokenCreated,
    TokenIn,
    TokenOut,
    TransitionOut,
)

CREATED = status.HTTP_201_CREATED


def make_router(site: Site) -> APIRouter:
    router = APIRouter()

    # --- tokens (admin) ---------------------------------------------------------------

    @router.post("/tokens", tags=["tokens"], status_code=CREATED)
    def add_token(body: TokenIn) -> TokenCreated:
        row, secret = tokens.add_token(site, name=body.name, role=body.role)
        return TokenCreated(name=row.name, role=row.role, created=row.created, token=secret)

    @router.get("/tokens", tags=["tokens"])
    def list_tokens() -> list[TokenOut]:
        return [TokenOut.model_validate(row) for row in tokens.list_tokens(site)]

    @router.delete("/tokens/{name}", tags=["tokens"])
    def remove_token(name: Name) -> Deleted:
        tokens.remove_token(site, name=name)
        return Deleted(deleted=name)

    # --- hosts -------------------------------------------------------------------------

    @router.post("/hosts", tags=["hosts"], status_code=CREATED)
    def add_host(body: HostIn) -> HostOut:
        row = hosts.add_host(
            site, name=body.name, url=body.url, token=body.token, fingerprint=body.fingerprint
        )
        return HostOut.model_validate(row)

    @router.get("/hosts", tags=["hosts"])
    def list_hosts() -> list[HostOut]:
        return [HostOut.model_validate(row) for row in hosts.list_hosts(site)]

    @router.get("/hosts/{name}", tags=["hosts"])
    def show_host(name: Name) -> HostOut:
        return HostOut.model_validate(hosts.get_host(site, name=name))

    @router.get("/hosts/{name}/vms", tags=["hosts"])
    def list_vms(name: Name) -> dict[str, Any]:
        return {"host": name, "domains": hosts.list_vms(site, name=name)}

    @router.delete("/hosts/{name}", tags=["hosts"])
    def remove_host(name: Name) -> Deleted:
        hosts.remove_host(site, name=name)
        return Deleted(deleted=name)

    # --- templates ---------------------------------------------------------------------

    def template_out(row: Template) -> TemplateOut:
        return documents.template_out(
            row,
            templates.format_every(row.every_seconds),
            templates.format_every(row.max_lag_seconds),
        )

    @router.post("/templates", tags=["templates"], status_code=CREATED)
    def add_template(body: TemplateIn) -> TemplateOut:
        row = templates.add_template(
            site,
            name=body.name,
            every=body.every,
            keep=body.keep,
            mirror=body.mirror,
            max_lag=body.max_lag,
        )
        return template_out(row)

    @router.get("/templates", tags=["templates"])
    def list_templates() -> list[TemplateOut]:
        return [template_out(row) for row in templates.list_templates(site)]

    @router.get("/templates/{name}", tags=["templates"])
    def show_template(name: Name) -> TemplateOut:
        return template_out(templates.get_template(site, name=name))

    @router.delete("/templates/{name}", tags=["templates"])
    def remove_template(name: Name) -> Deleted:
        templates.remove_template(site, name=name)
        return Deleted(deleted=name)

    # --- applications ------------------------------------------------------------------

    def app_out(row: App, downtime: float | None = None) -> AppOut:
        """One app as the API shows it, with its risk against its template's --max-lag."""
        now = datetime.now(UTC)
        return documents.app_out(row, now, downtime, apps.risks(site, [row], now)[row.name])

    @router.post("/apps", tags=["apps"], status_code=CREATED)
    def add_app(body: AppIn, who: Caller) -> AppOut:
        row = apps.add_app(
            site,
            name=body.name,
            host=body.host,
            kind=body.kind,
            path=apps.app_path(body.kind, path=body.path, domain=body.domain),
            hooks=body.hooks(),
            role=who.role,
            consistency=body.consistency,
        )
        return app_out(row)

    @router.get("/apps", tags=["apps"])
    def list_apps(
        request: Request,
        response: Response,
        limit: Limit = None,
        after: Annotated[str | None, Query(max_length=64, pattern=NAME_PATTERN)] = None,
    ) -> list[AppOut]:
        """Apps by name (paged with ``limit``/``after``: see X-Next-Cursor)."""
        rows = apps.list_apps(site, after=after, limit=fetch(limit))
        rows = page(rows, limit=limit, request=request, response=response, key=lambda r: r.name)
        now = datetime.now(UTC)
        return documents.app_outs(rows, now, failback.downtimes(site), apps.risks(site, rows, now))

    @router.get("/apps/{name}", tags=["apps"])
    def show_app(name: Name) -> AppOut:
        return app_out(apps.get_app(site, name=name), failback.downtimes(site).get(name))

    @router.patch("/apps/{name}", tags=["apps"])
    def set_app_hooks(name: Name, body: AppHooksIn, who: Caller) -> AppOut:
        row = apps.set_hooks(
            site, name=name, hooks=body.hooks(), role=who.role, consistency=body.consistency
        )
        return app_out(row, failback.downtimes(site).get(name))

    @router.delete("/apps/{name}", tags=["apps"])
    def remove_app(name: Name) -> Deleted:
        return Deleted(deleted=name, note=apps.remove_app(site, name=name))

    @router.post("/apps/{name}/protect", tags=["apps"])
    def protect_app(name: Name, body: ProtectIn, who: Caller) -> AppOut:
        return app_out(apps.protect_app(site, name=name, template=body.template, actor=who.name))

    @router.post("/apps/{name}/unprotect", tags=["apps"])
    def unprotect_app(name: Name, who: Caller) -> AppOut:
        return app_out(apps.unprotect_app(site, name=name, actor=who.name))

    @router.get("/apps/{name}/transitions", tags=["apps"])
    def list_transitions(name: Name) -> list[TransitionOut]:
        return [TransitionOut.model_validate(row) for row in apps.list_transitions(site, name=name)]

    return router
