"""The one HTTP client of tandem: pinned TLS, bearer token, error translation.

Every API answers errors as ``{"error": CODE, "message": TEXT}`` where CODE is the name of a
class in ``tandem.errors``; the client raises that same class with the server's message, so
a CLI user sees exactly what the server said and the right exit code.

Paths are built with ``api_path``, which quotes every segment: an id or name typed by a user
is one segment whatever it holds (``../apps/x`` stays inside the segment it was given for).
The client refuses to send a path with a ``.`` or ``..`` segment, which HTTP clients would
otherwise resolve into another resource.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Self, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from tandem import errors
from tandem.errors import RemoteError, TandemError, Unreachable
from tandem.transport.api import (
    AcceptIn,
    AppHooksIn,
    AppIn,
    AppOut,
    AuditOut,
    CaptureIn,
    CloneIn,
    CommitFailbackIn,
    Deleted,
    ExportOut,
    FailbackIn,
    FailoverIn,
    GcIn,
    GcOut,
    HostIn,
    HostOut,
    ImageOut,
    InfoOut,
    JobAnswer,
    JobLogOut,
    JobOut,
    MountIn,
    PairIn,
    PeerOut,
    PresentIn,
    ProtectIn,
    RestoreIn,
    TemplateIn,
    TemplateOut,
    TokenCreated,
    TokenIn,
    TokenOut,
    TransitionOut,
    VerifyOut,
)
from tandem.transport.tls import pinned_context

DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=300.0)


def error_from_response(status: int, body: bytes, what: str, name: str) -> TandemError:
    """The TandemError a failed response stands for."""
    try:
        doc = json.loads(body)
        code, message = doc["error"], doc["message"]
    except (ValueError, KeyError, TypeError):
        text = body.decode(errors="replace").strip()[:300] or f"HTTP {status}"
        return RemoteError(what=what, name=name, detail=f"HTTP {status}: {text}")
    cls = getattr(errors, str(code), None)
    if isinstance(cls, type) and issubclass(cls, TandemError):
        return cls(str(message))
    return RemoteError(what=what, name=name, detail=str(message))


def quote_segment(value: str) -> str:
    """``value`` as one path segment: every reserved character escaped, dots included
    when the whole segment is dots (``..`` would otherwise be resolved away)."""
    text = quote(str(value), safe="")
    if text.strip(".") == "":
        text = text.replace(".", "%2E")
    return text


def api_path(prefix: str, *segments: str) -> str:
    """``prefix`` (a literal path such as ``/api/v1/images``) followed by ``segments``,
    each quoted as one segment: ``api_path("/api/v1/images", image_id, "verify")``."""
    return "/".join([prefix.rstrip("/"), *(quote_segment(s) for s in segments)])


def check_path(path: str) -> str:
    """Return ``path`` unless it holds a ``.`` or ``..`` segment (which would name another
    resource than the one it was written for)."""
    segments = path.split("?", 1)[0].split("#", 1)[0].split("/")
    if any(s in (".", "..") for s in segments):
        raise errors.InvalidInput(
            detail=f"{path!r} is not a path this client sends: an id or name holds '.' or "
            "'..' segments; give the id exactly as `tandem` listed it"
        )
    return path


def check_url(url: str) -> str:
    """Return ``url`` if it can name a daemon (http(s), a host, a valid port), else raise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise errors.UrlInvalid(url=url, reason=str(exc)) from exc
    if parts.scheme not in ("https", "http") or not parts.hostname or port == 0:
        raise errors.UrlInvalid(url=url, reason="it needs https:// or http://, a host and a port")
    return url


class ApiClient:
    """A client for one tandem daemon (appliance or agent)."""

    def __init__(
        self,
        url: str,
        token: str | None,
        fingerprint: str | None,
        *,
        what: str = "appliance",
        name: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
    ) -> None:
        self.url = check_url(url).rstrip("/")
        self.what = what
        self.name = name or self.url
        self._token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify: Any = True
        if self.url.startswith("https://"):
            if not fingerprint:
                raise errors.ConnectionOptionMissing(
                    what=f"certificate fingerprint for {self.url}",
                    option="--fingerprint",
                    env="TANDEM_FINGERPRINT",
                )
            # Checked in the handshake of the client's own connection (one per command):
            # a wrong certificate raises CertificateMismatch before the token is sent.
            verify = pinned_context(self.url, fingerprint)
        self._http = httpx.Client(
            base_url=self.url, headers=headers, verify=verify, timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable_reason(self, reason: str) -> Unreachable:
        return Unreachable(what=self.what, name=self.name, url=self.url, reason=reason)

    def _unreachable(self, exc: Exception) -> Unreachable:
        return self._unreachable_reason(str(exc) or type(exc).__name__)

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
        raw: bool = False,
    ) -> Any:
        """Send a request; returns parsed JSON (or bytes with ``raw``); raises TandemError."""
        try:
            resp = self._http.request(
                method,
                check_path(path),
                json=json_body,
                content=content,
                params={k: v for k, v in (params or {}).items() if v is not None},
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if resp.status_code >= 400:
            raise error_from_response(resp.status_code, resp.content, self.what, self.name)
        if raw:
            return resp.content
        if not resp.content:
            return None
        return resp.json()

    def health(self) -> Any:
        """``GET /health``: answers without a token once the daemon serves."""
        return self.get("/health")

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json_body=body if body is not None else {})

    def delete(self, path: str, **params: Any) -> Any:
        return self.request("DELETE", path, params=params)

    def stream(self, path: str, body: Any) -> Iterator[dict[str, Any]]:
        """POST and read the answer as newline-delimited JSON events, as they arrive."""
        try:
            with self._http.stream(
                "POST", check_path(path), json=body, timeout=httpx.Timeout(30.0, read=None)
            ) as resp:
                if resp.status_code >= 400:
                    raise error_from_response(resp.status_code, resp.read(), self.what, self.name)
                for line in resp.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc


API = "/api/v1"

Doc = Any
"""A JSON document as a daemon answered it, where no model of ``transport.api`` names it."""

M = TypeVar("M", bound=BaseModel)


class ApplianceClient(ApiClient):
    """The appliance's REST API, one method per call: the only place outside the routes
    that knows its paths. Each takes the request model of ``transport.api`` (built with
    ``api.checked``, which names a bad field before anything is sent) and answers the
    document model the route declares; an answer of another shape is a ``RemoteError``.
    Names and ids are quoted as one segment each (``api_path``).
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        fingerprint: str | None,
        *,
        what: str = "appliance",
        name: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(url, token, fingerprint, what=what, name=name, timeout=timeout)

    def _as(self, model: type[M], answer: Any) -> M:
        try:
            return model.model_validate(answer)
        except ValidationError as exc:
            raise self._unexpected(model.__name__, answer, exc) from None

    def _list(self, model: type[M], answer: Any) -> list[M]:
        try:
            return TypeAdapter(list[model]).validate_python(answer)  # type: ignore[valid-type]
        except ValidationError as exc:
            raise self._unexpected(f"a list of {model.__name__}", answer, exc) from None

    def _unexpected(self, what: str, answer: Any, exc: ValidationError) -> RemoteError:
        return RemoteError(
            what=self.what,
            name=self.name,
            detail=f"it answered {str(answer)[:200]} where {what} was expected "
            f"({exc.error_count()} problem(s)); check that this tandem matches the "
            "appliance's version",
        )

    @staticmethod
    def _body(body: BaseModel | None) -> dict[str, Any]:
        """The JSON of ``body``: the fields it was given (the server fills the defaults,
        and a partial change such as ``AppHooksIn`` means what it names)."""
        return {} if body is None else body.model_dump(mode="json", exclude_unset=True)

    def _job(self, path: str, body: BaseModel | None = None) -> JobAnswer:
        return self._as(JobAnswer, self.post(path, self._body(body)))

    # --- operations (jobs) --------------------------------------------------------------

    def capture(self, app: str, body: CaptureIn) -> JobAnswer:
        return self._job(api_path(f"{API}/apps", app, "capture"), body)

    def restore(self, app: str, body: RestoreIn) -> JobAnswer:
        return self._job(api_path(f"{API}/apps", app, "restore"), body)

    def test_failover(self, app: str, body: PresentIn) -> JobAnswer:
        return self._job(api_path(f"{API}/apps", app, "test-failover"), body)

    def failover(self, app: str, body: FailoverIn) -> JobAnswer:
        return self._job(api_path(f"{API}/apps", app, "failover"), body)

    def syncback(self, app: str, body: CaptureIn) -> JobAnswer:
        return self._job(api_path(f"{API}/apps", app, "syncback"), body)

    def failback(self, app: str, body: FailbackIn) -> JobAnswer:
        return self._job(api_path(f"{API}/apps", app, "failback"), body)

    def commit_failback(self, app: str, body: CommitFailbackIn) -> JobAnswer:
        return self._job(api_path(f"{API}/apps", app, "commit-failback"), body)

    def undo_failback(self, app: str) -> JobAnswer:
        return self._job(api_path(f"{API}/apps", app, "undo-failback"))

    def replicate(self, app: str) -> JobAnswer:
        return self._job(api_path(f"{API}/apps", app, "replicate"))

    def mount(self, image: str, body: MountIn) -> JobAnswer:
        return self._job(api_path(f"{API}/images", image, "mount"), body)

    def clone(self, image: str, body: CloneIn) -> JobAnswer:
        return self._job(api_path(f"{API}/images", image, "clone"), body)

    def delete_image(self, image: str) -> JobAnswer:
        """Start the job deleting ``image``."""
        return self._as(JobAnswer, self.delete(api_path(f"{API}/images", image)))

    def collect_garbage(self) -> JobAnswer:
        return self._job(f"{API}/gc")

    def start(self, route: str, subject: str = "", body: BaseModel | None = None) -> JobAnswer:
        """Start the operation whose API call is ``route`` (``"POST /images/{image_id}/verify"``,
        an operation's ``Spec.route``), its one ``{…}`` segment ``subject`` (quoted)."""
        method, path = route.split(" ", 1)
        segments = [subject if s.startswith("{") else s for s in path.strip("/").split("/")]
        answer = self.request(method, api_path(API, *segments), json_body=self._body(body))
        return self._as(JobAnswer, answer)

    # --- jobs ---------------------------------------------------------------------------

    def jobs(
        self,
        *,
        app: str | None = None,
        status: list[str] | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[JobOut]:
        """Jobs, newest first."""
        answer = self.get(f"{API}/jobs", app=app, status=status, limit=limit, after=after)
        return self._list(JobOut, answer)

    def job(self, job: str, *, wait: float | None = None) -> JobOut:
        """The job; with ``wait``, answered as soon as it ends or after ``wait`` seconds."""
        return self._as(JobOut, self.get(api_path(f"{API}/jobs", job), wait=wait))

    def job_log(self, job: str) -> list[JobLogOut]:
        return self._list(JobLogOut, self.get(api_path(f"{API}/jobs", job, "log")))

    def cancel_job(self, job: str) -> JobAnswer:
        return self._job(api_path(f"{API}/jobs", job, "cancel"))

    def gc_settings(self) -> GcOut:
        return self._as(GcOut, self.get(f"{API}/gc"))

    def set_gc(self, changes: GcIn) -> GcOut:
        answer = self.request("PATCH", f"{API}/gc", json_body=self._body(changes))
        return self._as(GcOut, answer)

    def audit(self, limit: int) -> list[AuditOut]:
        return self._list(AuditOut, self.get(f"{API}/audit", limit=limit))

    # --- images -------------------------------------------------------------------------

    def images(self, app: str) -> list[ImageOut]:
        return self._list(ImageOut, self.get(api_path(f"{API}/apps", app, "images")))

    def image(self, image: str) -> ImageOut:
        return self._as(ImageOut, self.get(api_path(f"{API}/images", image)))

    def export_image(self, image: str) -> ExportOut:
        return self._as(ExportOut, self.post(api_path(f"{API}/images", image, "export")))

    def verify_image(self, image: str) -> VerifyOut:
        return self._as(VerifyOut, self.get(api_path(f"{API}/images", image, "verify")))

    def unmount(self, image: str) -> ImageOut:
        return self._as(ImageOut, self.post(api_path(f"{API}/images", image, "unmount"), {}))

    # --- set-up -------------------------------------------------------------------------

    def tokens(self) -> list[TokenOut]:
        return self._list(TokenOut, self.get(f"{API}/tokens"))

    def add_token(self, body: TokenIn) -> TokenCreated:
        return self._as(TokenCreated, self.post(f"{API}/tokens", self._body(body)))

    def remove_token(self, name: str) -> Deleted:
        return self._as(Deleted, self.delete(api_path(f"{API}/tokens", name)))

    def hosts(self) -> list[HostOut]:
        return self._list(HostOut, self.get(f"{API}/hosts"))

    def add_host(self, body: HostIn) -> HostOut:
        return self._as(HostOut, self.post(f"{API}/hosts", self._body(body)))

    def remove_host(self, name: str) -> Deleted:
        return self._as(Deleted, self.delete(api_path(f"{API}/hosts", name)))

    def vms(self, host: str) -> Doc:
        """The libvirt domains of a hypervisor host (the agent's document, passed on)."""
        return self.get(api_path(f"{API}/hosts", host, "vms"))

    def templates(self) -> list[TemplateOut]:
        return self._list(TemplateOut, self.get(f"{API}/templates"))

    def add_template(self, body: TemplateIn) -> TemplateOut:
        return self._as(TemplateOut, self.post(f"{API}/templates", self._body(body)))

    def remove_template(self, name: str) -> Deleted:
        return self._as(Deleted, self.delete(api_path(f"{API}/templates", name)))

    def apps(self) -> list[AppOut]:
        return self._list(AppOut, self.get(f"{API}/apps"))

    def app(self, name: str) -> AppOut:
        return self._as(AppOut, self.get(api_path(f"{API}/apps", name)))

    def add_app(self, body: AppIn) -> AppOut:
        return self._as(AppOut, self.post(f"{API}/apps", self._body(body)))

    def set_app(self, name: str, changes: AppHooksIn) -> AppOut:
        path = api_path(f"{API}/apps", name)
        return self._as(AppOut, self.request("PATCH", path, json_body=self._body(changes)))

    def remove_app(self, name: str) -> Deleted:
        return self._as(Deleted, self.delete(api_path(f"{API}/apps", name)))

    def protect(self, name: str, body: ProtectIn) -> AppOut:
        path = api_path(f"{API}/apps", name, "protect")
        return self._as(AppOut, self.post(path, self._body(body)))

    def unprotect(self, name: str) -> AppOut:
        return self._as(AppOut, self.post(api_path(f"{API}/apps", name, "unprotect")))

    def transitions(self, name: str) -> list[TransitionOut]:
        path = api_path(f"{API}/apps", name, "transitions")
        return self._list(TransitionOut, self.get(path))

    # --- the other site -----------------------------------------------------------------

    def peers(self) -> list[PeerOut]:
        return self._list(PeerOut, self.get(f"{API}/peers"))

    def add_peer(self, body: PairIn) -> PeerOut:
        return self._as(PeerOut, self.post(f"{API}/peers", self._body(body)))

    def remove_peer(self, name: str) -> Deleted:
        return self._as(Deleted, self.delete(api_path(f"{API}/peers", name)))

    def info(self) -> InfoOut:
        """The appliance's name and version (what pairing reads first)."""
        return self._as(InfoOut, self.get(f"{API}/info"))

    def accept_peer(self, body: AcceptIn) -> Doc:
        """Pairing's second half, asked of the other appliance: it stores us as its peer
        (answers its name and the token it made for us)."""
        return self.post(f"{API}/peers/accept", self._body(body))
