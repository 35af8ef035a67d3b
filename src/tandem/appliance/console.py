"""The web console: the pages an operator drives the DR lifecycle from.

Pages (server-rendered with Jinja2; ``templates/``): sign-in, App Manager (``/apps``),
Access (``/apps/{name}``: the image timeline and the operations the selected image allows),
drill report (``/apps/{name}/report``), Monitor (``/monitor``) and a job's page
(``/jobs/{id}``).

Invariants
- Every page but sign-in needs a console session; without a valid one a page answers
  303 to ``/sign-in``. A session is kept on the server: the cookie is a random id made at
  sign-in from an API token, and the catalog holds its SHA-256, its token and its expiry
  (so sessions outlive a restart). Signing out deletes the row: the old cookie is refused
  from then on, whoever replays it. Deleting a token deletes its sessions; an expired
  session returns to sign-in, and expired rows are purged at each sign-in.
- Roles are the API's: pages need ``viewer``, actions ``operator`` (``auth.needed_role`` of
  the same call under ``/api/v1``).
- Every action is a POST carrying the session's CSRF token (an HMAC of the session); the
  cookie is HttpOnly, Secure and SameSite=Strict. Actions are audited like API calls.
- Actions call the same operations as the API, through the same entries of
  ``operations.registry`` (titles, dangers, handlers): a form is read into the request model
  of the API's call (``form_request``), so a bad value is refused with the API's message,
  and goes to the same ``submit``. Typed confirmations are checked by the
  operation on the server whatever the page did; the page's script only keeps the button
  disabled until the text matches. A restore's two warnings come one after the other: the
  form asks for ``DATA LOSS``; once the server accepted it, the page shows the second
  warning and asks for ``OVERWRITE OTHER APPS`` (a two-step form, no script needed).
- Capabilities are not shown: a presented image's NBD export URI (it holds the export's
  secret) appears only after an operator asks for it with the page's "Show NBD export"
  button, a POST (so audited); job messages and logs are shown with such secrets hidden.
- Everything works without JavaScript (``static/console.js`` adds live progress only): a
  running job's page refreshes itself, and a job started from an app's page returns to that
  app's timeline when it succeeds (SPEC §6).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import quote, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from tandem import __version__
from tandem.appliance.auth import Principal
from tandem.appliance.documents import app_out
from tandem.catalog import queries as q
from tandem.catalog.models import App, Image, Job
from tandem.domain.images import ImageState
from tandem.domain.jobs import ACTIVE, JobStatus
from tandem.domain.lifecycle import AppKind, Operation
from tandem.domain.rules import (
    FAILOVER_CONFIRMATION,
    RESTORE_CONFIRMATIONS,
    UNMOUNT,
    VM_TARGET_CONFIRMATION,
    ImageOperation,
    Role,
    app_operations,
    confirmations_accepted,
    image_operations,
    role_allows,
)
from tandem.domain.units import human_bytes
from tandem.errors import NotFound, TandemError
from tandem.operations import (
    apps,
    failback,
    hosts,
    images,
    monitor,
    mount,
    replica_failback,
    report,
)
from tandem.operations.present import ACTIONS as MOUNT_ACTIONS
from tandem.operations.registry import BY_NAME, BY_OPERATION, REGISTRY, Spec
from tandem.operations.site import Site
from tandem.transport.api import NAME, checked, hide_secrets

COOKIE = "tandem_console"
SESSION_SECONDS = 12 * 3600
SECRET_SETTING = "console.secret"
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")


# --- sessions ---------------------------------------------------------------------------


class SignInRequired(Exception):
    """No valid console session: the page answers with a redirect to sign-in."""

    def __init__(self, next_url: str, reason: str | None = None) -> None:
        self.next_url = next_url
        self.reason = reason


class ConsoleSessions:
    """Makes, checks and ends console sessions (see the module's invariants)."""

    def __init__(self, site: Site, lifetime: int = SESSION_SECONDS) -> None:
        self.site = site
        self.lifetime = lifetime
        self._secret: bytes | None = None

    def _key(self) -> bytes:
        if self._secret is None:
            with self.site.catalog.begin() as session:
                value = q.get_setting(session, key=SECRET_SETTING)
                if value is None:
                    value = secrets.token_hex(32)
                    q.set_setting(session, key=SECRET_SETTING, value=value)
            self._secret = bytes.fromhex(value)
        return self._secret

    def _mac(self, text: str) -> str:
        return hmac.new(self._key(), text.encode(), hashlib.sha256).hexdigest()

    def sign_in(self, token: str) -> tuple[str, Principal] | None:
        """A session cookie for ``token``, or ``None`` when the appliance does not know it."""
        now = datetime.now(UTC)
        with self.site.catalog.begin() as session:
            row = q.find_token(session, token=token.strip())
            if row is None or row.role is Role.PEER:
                return None
            q.purge_console_sessions(session, now=now)
            cookie = secrets.token_urlsafe(32)
            expires = now + timedelta(seconds=self.lifetime)
            q.add_console_session(session, session_id=cookie, token=row, expires=expires)
            return cookie, Principal(name=row.name, role=row.role)

    def principal(self, cookie: str | None) -> tuple[Principal | None, str | None]:
        """Who a session cookie stands for, or ``None`` and why not."""
        if not cookie:
            return None, None
        with self.site.catalog.read() as session:
            row = q.find_console_session(session, session_id=cookie)
            if row is None:
                return None, (
                    "Your session has ended: you signed out, or its token was deleted. "
                    "Sign in again with a valid token."
                )
            if row.expires <= datetime.now(UTC):
                return None, "Your session expired. Sign in again."
            return Principal(name=row.token.name, role=row.token.role), None

    def sign_out(self, cookie: str | None) -> None:
        """End the session ``cookie`` names: from now on it is refused."""
        if cookie:
            with self.site.catalog.begin() as session:
                q.remove_console_session(session, session_id=cookie)

    def csrf(self, cookie: str) -> str:
        return self._mac(f"csrf:{cookie}")[:32]


# --- what the pages show ----------------------------------------------------------------


@dataclass(frozen=True)
class FormField:
    """One field of a form the console makes from an operation's request model (an
    operation without a hand-written block on the Access page): its ``kind`` is the input's
    (``checkbox``, ``select``, ``number`` or ``text``), ``label`` the field's title,
    ``hint`` its description."""

    name: str
    label: str
    kind: str
    required: bool = False
    options: tuple[str, ...] = ()
    hint: str | None = None


def form_fields(model: type[BaseModel] | None) -> tuple[FormField, ...]:
    """The form of ``model``'s fields: bool → checkbox, Literal → select, int → number,
    anything else → text (``form_request`` reads them back with the same model)."""
    if model is None:
        return ()
    made = []
    for name, field in model.model_fields.items():
        kind = "text"
        options: tuple[str, ...] = ()
        shape = field.annotation
        if get_origin(shape) in (Union, UnionType):  # X | None: the X
            shape = next(a for a in get_args(shape) if a is not type(None))
        if shape is bool:
            kind = "checkbox"
        elif get_origin(shape) is Literal:
            kind, options = "select", tuple(str(a) for a in get_args(shape))
        elif shape is int:
            kind = "number"
        label = field.title or name.replace("_", " ").capitalize()
        made.append(FormField(name, label, kind, field.is_required(), options, field.description))
    return tuple(made)


@dataclass(frozen=True)
class Action:
    """An operation a selected image allows, as the Access page offers it; ``fields``: the
    form made from its request model (shown when the page has no hand-written one)."""

    name: str
    title: str
    danger: bool = False
    fields: tuple[FormField, ...] = ()


TITLES: Mapping[str, str] = {
    **{spec.name: spec.title for spec in REGISTRY if spec.title is not None},
    UNMOUNT: "Unmount",
}
"""The console's operations: the registry's titled ones, and unmount (not a job)."""
DANGER = frozenset(spec.name for spec in REGISTRY if spec.danger)


def _action(op: ImageOperation | Spec) -> Action:
    if isinstance(op, Spec):
        return Action(op.name, TITLES[op.name], op.danger, form_fields(op.request))
    if isinstance(op, Operation):
        return _action(BY_OPERATION[op])
    return Action(UNMOUNT, TITLES[UNMOUNT])


ANY_IMAGE = tuple(
    spec
    for spec in REGISTRY
    if spec.subject == "image" and spec.lifecycle is None and spec.title is not None
)
"""Image operations outside the lifecycle (they only read an image: ``verify``): offered on
every image that is not being deleted, after the lifecycle's."""


def image_actions(app: App, image: Image, *, production: bool) -> list[Action]:
    """The operations ``image`` of ``app`` allows now, in lifecycle order
    (``rules.image_operations``; the operation itself decides on the facts: a refused
    action answers with the reason on the page). ``production`` says whether this
    appliance runs the app's production copy (its host is registered here)."""
    offered: list[ImageOperation | Spec] = [
        *image_operations(
            app_state=app.state, kind=image.kind, image_state=image.state, production=production
        ),
        *(ANY_IMAGE if image.state is not ImageState.DELETING else ()),
    ]
    return [_action(op) for op in offered]


def _progress(job: Job) -> int | None:
    if job.bytes_total <= 0:
        return 100 if job.status is JobStatus.SUCCEEDED else None
    return min(100, int(100 * job.bytes_done / job.bytes_total))


def _seconds(job: Job) -> float | None:
    if job.started is None:
        return None
    end = job.finished or datetime.now(UTC)
    return max(0.0, (end - job.started).total_seconds())


def fmt_bytes(n: int | None) -> str:
    return "—" if n is None else human_bytes(n)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def fmt_time(ts: datetime | None) -> str:
    return "—" if ts is None else ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


templates.env.filters.update(
    bytes=fmt_bytes, seconds=fmt_seconds, time=fmt_time, hide_secrets=hide_secrets
)
templates.env.globals.update(
    version=__version__,
    progress=_progress,
    job_seconds=_seconds,
    FAILOVER_CONFIRMATION=FAILOVER_CONFIRMATION,
    RESTORE_CONFIRMATIONS=RESTORE_CONFIRMATIONS,
    VM_TARGET_CONFIRMATION=VM_TARGET_CONFIRMATION,
    MOUNT_ACTIONS=MOUNT_ACTIONS,
    TARGETS=replica_failback.TARGETS,
    ACTIVE=ACTIVE,
)


# --- the routes -------------------------------------------------------------------------


def _blank(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def install_console(app: FastAPI, site: Site, *, lifetime: int = SESSION_SECONDS) -> None:
    """Serve the console at ``/`` (and its static files at ``/static``) on ``app``."""
    sessions = ConsoleSessions(site, lifetime)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(SignInRequired)
    async def to_sign_in(request: Request, exc: SignInRequired) -> Response:
        query = {"next": exc.next_url}
        if exc.reason:
            query["reason"] = exc.reason
        response = RedirectResponse(f"/sign-in?{urlencode(query)}", status_code=303)
        if exc.reason:
            response.delete_cookie(COOKIE, path="/")
        return response

    @app.exception_handler(_Refused)
    async def refused(request: Request, exc: _Refused) -> Response:
        who = getattr(request.state, "principal", None)
        return templates.TemplateResponse(
            request,
            "error.html",
            {"request": request, "who": who, "site_name": site.name, "error": exc.message},
            status_code=exc.status,
        )

    app.include_router(_make_router(site, sessions))


def _make_router(site: Site, sessions: ConsoleSessions) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def require(request: Request, needed: Role = Role.VIEWER) -> Principal:
        who, reason = sessions.principal(request.cookies.get(COOKIE))
        if who is None:
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise SignInRequired(here if request.method == "GET" else "/apps", reason)
        request.state.principal = who  # the audit trail's actor
        if not role_allows(who.role, needed):
            raise _Refused(
                403,
                f"Your token {who.name!r} has the role {who.role.value}; this needs "
                f"{needed.value}. Sign in with an {needed.value} token.",
            )
        return who

    def page(
        request: Request, name: str, who: Principal | None, status: int = 200, **ctx: Any
    ) -> HTMLResponse:
        cookie = request.cookies.get(COOKIE, "")
        ctx.update(
            request=request,
            who=who,
            site_name=site.name,
            csrf=sessions.csrf(cookie) if who else "",
            can_act=who is not None and role_allows(who.role, Role.OPERATOR),
        )
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    async def form_of(request: Request) -> dict[str, str]:
        form = await request.form()
        cookie = request.cookies.get(COOKIE, "")
        token = str(form.get("csrf", ""))
        if not cookie or not hmac.compare_digest(token, sessions.csrf(cookie)):
            raise _Refused(
                403,
                "This form is stale or did not come from this console (CSRF check). "
                "Reload the page and submit it again.",
            )
        return {k: str(v) for k, v in form.multi_items() if isinstance(v, str)}

    # --- sign-in --------------------------------------------------------------------

    @router.get("/", response_class=HTMLResponse)
    def root(request: Request) -> Response:
        require(request)
        return RedirectResponse("/apps", status_code=303)

    @router.get("/sign-in", response_class=HTMLResponse)
    def sign_in_page(request: Request, next: str = "/apps", reason: str | None = None) -> Response:
        return page(request, "sign_in.html", None, next=_local(next), error=reason)

    @router.post("/sign-in", response_class=HTMLResponse)
    async def sign_in(request: Request) -> Response:
        form = await request.form()
        token = str(form.get("token", ""))
        target = _local(str(form.get("next", "/apps")))
        made = await run_in_threadpool(sessions.sign_in, token) if token.strip() else None
        if made is None:
            return page(
                request,
                "sign_in.html",
                None,
                status=401,
                next=target,
                error="That token is wrong: this appliance does not know it. "
                "Paste an API token made with `tandem token add`.",
            )
        cookie, who = made
        request.state.principal = who
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            cookie,
            max_age=sessions.lifetime,
            path="/",
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return response

    @router.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        cookie = request.cookies.get(COOKIE)
        who, _ = await run_in_threadpool(sessions.principal, cookie)
        request.state.principal = who  # the audit trail's actor
        await run_in_threadpool(sessions.sign_out, cookie)
        response = RedirectResponse("/sign-in", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # --- App Manager ------------------------------------------------------------------

    @router.get("/apps", response_class=HTMLResponse)
    def app_manager(request: Request) -> Response:
        who = require(request)
        now = datetime.now(UTC)
        downtimes = failback.downtimes(site)
        listed = apps.list_apps(site)
        risk = apps.risks(site, listed, now)
        rows = [app_out(a, now, downtimes.get(a.name), risk[a.name]) for a in listed]
        power = hosts.power_states(site, [a for a in listed if a.kind is AppKind.VM])
        return page(request, "apps.html", who, apps=rows, power=power)

    # --- Access -----------------------------------------------------------------------

    def access(
        request: Request,
        who: Principal,
        name: str,
        *,
        selected: str | None = None,
        error: str | None = None,
        status: int = 200,
        form: Mapping[str, str] | None = None,
        open_action: str | None = None,
        export_uri: str | None = None,
    ) -> HTMLResponse:
        try:
            row = apps.get_app(site, name=name)
        except NotFound as exc:
            return page(request, "error.html", who, status=404, error=exc.message)
        timeline = images.list_images(site, app=name)
        image = next((i for i in timeline if i.id == selected), None)
        if image is None and timeline:
            image = timeline[0]
        host_names = [h.name for h in hosts.list_hosts(site)]
        production = row.host in host_names
        done = None
        done_id = request.query_params.get("done")
        if done_id:
            try:
                done = monitor.get_job(site, job_id=done_id)
            except NotFound:
                done = None
        recent = monitor.list_jobs(site, app=name, limit=5)
        return page(
            request,
            "access.html",
            who,
            status=status,
            app=row,
            app_out=app_out(
                row, None, failback.downtimes(site).get(name), apps.risks(site, [row])[name]
            ),
            timeline=timeline,
            image=image,
            actions=image_actions(row, image, production=production) if image else [],
            app_actions=_app_actions(row, production),
            hosts=host_names,
            production=production,
            done=done,
            recent=recent,
            error=error,
            form=form or {},
            open_action=open_action,
            volume=row.kind is AppKind.VOLUME,
            vm=row.kind is AppKind.VM,
            export_uri=export_uri if image is not None and image.nbd_export else None,
            restore_step=_restore_step(form or {}),
        )

    @router.get("/apps/{name}", response_class=HTMLResponse)
    def access_page(request: Request, name: str, image: str | None = None) -> Response:
        who = require(request)
        return access(request, who, name, selected=image)

    @router.post("/apps/{name}/actions/{action}", response_class=HTMLResponse)
    async def act(request: Request, name: str, action: str) -> Response:
        who = require(request, Role.OPERATOR)
        form = await form_of(request)
        handler = HANDLERS.get(action)
        image = _blank(form.get("image"))
        if action == "restore" and not form.get("confirm2") and _restore_step(form) == 2:
            # The first warning was accepted: now the second one (SPEC §4.4), no job yet.
            return await run_in_threadpool(
                lambda: access(request, who, name, selected=image, form=form, open_action=action)
            )
        if handler is None:
            return access(
                request, who, name, selected=image, status=404,
                error=f"There is no operation {action!r}. Pick one of the buttons below.",
            )  # fmt: skip
        try:
            job = await run_in_threadpool(handler, site, name, form, who.name)
        except TandemError as exc:
            message, status = exc.message, exc.http_status
            return await run_in_threadpool(
                lambda: access(
                    request,
                    who,
                    name,
                    selected=image,
                    error=message,
                    status=status,
                    form=form,
                    open_action=action,
                )
            )
        if job is None:  # done at once (unmount)
            return RedirectResponse(f"/apps/{quote(name)}?image={image or ''}", status_code=303)
        return RedirectResponse(f"/jobs/{job.id}?app={quote(name)}", status_code=303)

    @router.post("/apps/{name}/export", response_class=HTMLResponse)
    async def show_export(request: Request, name: str) -> Response:
        """A presented image's NBD export, shown on purpose (a POST: audited), to operators."""
        who = require(request, Role.OPERATOR)
        form = await form_of(request)
        image_id = form.get("image", "")

        def answer() -> HTMLResponse:
            try:
                uri = images.export_uri(site, image_id=image_id, app=name)
            except TandemError as exc:
                return access(
                    request, who, name, selected=image_id, status=exc.http_status,
                    error=exc.message,
                )  # fmt: skip
            return access(request, who, name, selected=image_id, export_uri=uri)

        return await run_in_threadpool(answer)

    @router.get("/apps/{name}/report", response_class=HTMLResponse)
    def drill_report(request: Request, name: str) -> Response:
        who = require(request)
        try:
            data = report.drill_report(site, app=name)
        except NotFound as exc:
            return page(request, "error.html", who, status=404, error=exc.message)
        return page(request, "report.html", who, report=data)

    # --- Monitor ----------------------------------------------------------------------

    def jobs_of(request: Request) -> tuple[list[Job], dict[str, str]]:
        app_name = _blank(request.query_params.get("app"))
        status_text = _blank(request.query_params.get("status"))
        shown = {"app": app_name or "", "status": status_text or ""}
        if app_name is not None and not re.fullmatch(NAME, app_name):
            return [], shown  # not an application name: no job has it
        status = [JobStatus(status_text)] if status_text in set(JobStatus) else None
        return monitor.list_jobs(site, app=app_name, status=status, limit=200), shown

    @router.get("/monitor", response_class=HTMLResponse)
    def monitor_page(request: Request) -> Response:
        who = require(request)
        rows, filters = jobs_of(request)
        live = any(j.status in ACTIVE for j in rows)
        return page(
            request, "monitor.html", who, jobs=rows, filters=filters, live=live,
            statuses=[s.value for s in JobStatus],
        )  # fmt: skip

    @router.get("/monitor/rows", response_class=HTMLResponse)
    def monitor_rows(request: Request) -> Response:
        who = require(request)
        rows, _ = jobs_of(request)
        return page(request, "monitor_rows.html", who, jobs=rows)

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: str, app: str | None = None) -> Response:
        who = require(request)
        try:
            job = monitor.get_job(site, job_id=job_id)
        except NotFound as exc:
            return page(request, "error.html", who, status=404, error=exc.message)
        if app and job.status is JobStatus.SUCCEEDED and job.app == app:
            # SPEC §6: back to the app's timeline once the job succeeded.
            target = f"/apps/{quote(app)}?done={job.id}"
            if job.image:
                target += f"&image={job.image}"
            return RedirectResponse(target, status_code=303)
        log = monitor.job_log(site, job_id=job_id)
        return page(request, "job.html", who, job=job, log=log, back=app)

    @router.get("/jobs/{job_id}/status")
    def job_status(request: Request, job_id: str) -> Response:
        require(request)
        try:
            job = monitor.get_job(site, job_id=job_id)
        except NotFound as exc:
            return JSONResponse({"error": exc.message}, status_code=404)
        return JSONResponse(
            {
                "status": job.status.value,
                "message": hide_secrets(job.message),
                "progress": _progress(job),
                "bytes_done": fmt_bytes(job.bytes_done),
                "bytes_total": fmt_bytes(job.bytes_total),
                "bytes_sent": fmt_bytes(job.bytes_sent),
                "seconds": fmt_seconds(_seconds(job)),
                "active": job.status in ACTIVE,
            }
        )

    return router


class _Refused(TandemError):
    """{detail}"""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


def _local(url: str) -> str:
    """Only this console's own pages are redirect targets (no open redirect)."""
    if not url.startswith("/") or url.startswith("//") or "\\" in url:
        return "/apps"
    return url


def _restore_step(form: Mapping[str, str]) -> int:
    """Which of a restore's two warnings the form is at: 2 once ``DATA LOSS`` was typed."""
    typed = _confirmations(form, "confirm")
    return 2 if confirmations_accepted(typed, BY_NAME["restore"].confirmations) >= 1 else 1


def _app_actions(app: App, production: bool) -> list[Action]:
    return [_action(op) for op in app_operations(app_state=app.state, production=production)]


# --- what each action does ----------------------------------------------------------------

Handler = Callable[[Site, str, Mapping[str, str], str], Job | None]


def _confirmations(form: Mapping[str, str], *fields: str) -> list[str]:
    return [form[f] for f in fields if form.get(f)]


def form_request(model: type[BaseModel], form: Mapping[str, str]) -> BaseModel:
    """The API's request model of an operation, read from its console form: the same
    checks, so a bad value gets the API's message. A checkbox is ``on``; the typed
    confirmations are ``confirm``, ``confirm2`` (a restore's second warning) and
    ``vm_confirm`` (``REPLACE VM``), in that order; ``hosts`` is a comma-separated list."""
    fields: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name == "confirm":
            fields[name] = _confirmations(form, "confirm", "confirm2", "vm_confirm")
        elif name == "hosts":
            listed = [h.strip() for h in form.get(name, "").split(",") if h.strip()]
            fields[name] = listed or None
        elif field.annotation is bool:
            fields[name] = form.get(name) == "on"
        elif name in form or field.is_required():
            value = form.get(name, "").strip()
            fields[name] = value if value or field.is_required() else None
    return checked(model, **fields)


def _handler(spec: Spec) -> Handler:
    """What the console does for ``spec``'s form: its request, then its ``submit``."""

    def handle(site: Site, app: str, form: Mapping[str, str], actor: str) -> Job:
        body = form_request(spec.request, form) if spec.request is not None else None
        subject = app if spec.subject == "app" else form.get("image", "")
        return spec.submit(site, subject, body, actor)

    return handle


def _unmount(site: Site, app: str, form: Mapping[str, str], actor: str) -> None:
    mount.unmount(site, image=form.get("image", ""))


HANDLERS: Mapping[str, Handler] = {
    **{spec.name: _handler(spec) for spec in REGISTRY if spec.title is not None},
    UNMOUNT: _unmount,
}
