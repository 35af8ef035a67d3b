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
from typing import Any, Self
from urllib.parse import quote, urlsplit

import httpx

from tandem import errors
from tandem.errors import RemoteError, TandemError, Unreachable
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
        raise errors.InvalidInput(detail=f"{url!r} is not a valid URL ({exc})") from exc
    if parts.scheme not in ("https", "http") or not parts.hostname or port == 0:
        raise errors.InvalidInput(
            detail=f"{url!r} is not a daemon URL; write it like https://HOST:PORT"
        )
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
                raise errors.InvalidInput(
                    detail=f"no certificate fingerprint for {self.url}: pass --fingerprint"
                    " or set TANDEM_FINGERPRINT"
                )
            try:
                verify = pinned_context(self.url, fingerprint)
            except Unreachable as exc:
                # Name the party as the caller knows it ("host web1"), not as a bare address.
                raise self._unreachable_reason(str(exc.fields.get("reason", exc))) from exc
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
"""A JSON document as the appliance answered it (the wire models move here with issue #13)."""


class ApplianceClient(ApiClient):
    """The appliance's REST API, one thin method per call: the only place outside the
    routes that knows its paths. Names and ids are quoted as one segment each (``api_path``).

    Operations that start a job answer ``{"job": {...}, ...}``: ``start`` for those on an
    application (``capture``, ``failover``…) and ``start_on_image`` for those on an image
    (``mount``, ``clone``); both take the operation's name as the API spells it.
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

    # --- operations (jobs) --------------------------------------------------------------

    def start(self, app: str, operation: str, params: dict[str, Any] | None = None) -> Doc:
        """Start ``operation`` (``capture``, ``test-failover``…) on ``app``."""
        return self.post(api_path(f"{API}/apps", app, operation), params or {})

    def start_on_image(self, image: str, operation: str, params: dict[str, Any]) -> Doc:
        """Start ``operation`` (``mount``, ``clone``) on ``image``."""
        return self.post(api_path(f"{API}/images", image, operation), params)

    def delete_image(self, image: str) -> Doc:
        """Start the job deleting ``image``."""
        return self.delete(api_path(f"{API}/images", image))

    def collect_garbage(self) -> Doc:
        return self.post(f"{API}/gc")

    # --- jobs ---------------------------------------------------------------------------

    def jobs(self, **filters: Any) -> Doc:
        """Jobs, newest first (``app``, ``status``, ``limit``, ``after``)."""
        return self.get(f"{API}/jobs", **filters)

    def job(self, job: str, *, wait: float | None = None) -> Doc:
        """The job; with ``wait``, answered as soon as it ends or after ``wait`` seconds."""
        if wait is None:
            return self.get(api_path(f"{API}/jobs", job))
        return self.get(api_path(f"{API}/jobs", job), wait=wait)

    def job_log(self, job: str) -> Doc:
        return self.get(api_path(f"{API}/jobs", job, "log"))

    def cancel_job(self, job: str) -> Doc:
        return self.post(api_path(f"{API}/jobs", job, "cancel"))

    def gc_settings(self) -> Doc:
        return self.get(f"{API}/gc")

    def set_gc(self, changes: dict[str, Any]) -> Doc:
        return self.request("PATCH", f"{API}/gc", json_body=changes)

    def audit(self, limit: int) -> Doc:
        return self.get(f"{API}/audit", limit=limit)

    # --- images -------------------------------------------------------------------------

    def images(self, app: str) -> Doc:
        return self.get(api_path(f"{API}/apps", app, "images"))

    def image(self, image: str) -> Doc:
        return self.get(api_path(f"{API}/images", image))

    def export_image(self, image: str) -> Doc:
        return self.post(api_path(f"{API}/images", image, "export"))

    def verify_image(self, image: str) -> Doc:
        return self.get(api_path(f"{API}/images", image, "verify"))

    def unmount(self, image: str) -> Doc:
        return self.post(api_path(f"{API}/images", image, "unmount"), {})

    # --- set-up -------------------------------------------------------------------------

    def tokens(self) -> Doc:
        return self.get(f"{API}/tokens")

    def add_token(self, name: str, role: str) -> Doc:
        return self.post(f"{API}/tokens", {"name": name, "role": role})

    def remove_token(self, name: str) -> Doc:
        return self.delete(api_path(f"{API}/tokens", name))

    def hosts(self) -> Doc:
        return self.get(f"{API}/hosts")

    def add_host(self, name: str, url: str, token: str, fingerprint: str) -> Doc:
        body = {"name": name, "url": url, "token": token, "fingerprint": fingerprint}
        return self.post(f"{API}/hosts", body)

    def remove_host(self, name: str) -> Doc:
        return self.delete(api_path(f"{API}/hosts", name))

    def vms(self, host: str) -> Doc:
        """The libvirt domains of a hypervisor host."""
        return self.get(api_path(f"{API}/hosts", host, "vms"))

    def templates(self) -> Doc:
        return self.get(f"{API}/templates")

    def add_template(self, params: dict[str, Any]) -> Doc:
        return self.post(f"{API}/templates", params)

    def remove_template(self, name: str) -> Doc:
        return self.delete(api_path(f"{API}/templates", name))

    def apps(self) -> Doc:
        return self.get(f"{API}/apps")

    def app(self, name: str) -> Doc:
        return self.get(api_path(f"{API}/apps", name))

    def add_app(self, params: dict[str, Any]) -> Doc:
        return self.post(f"{API}/apps", params)

    def set_app(self, name: str, changes: dict[str, Any]) -> Doc:
        return self.request("PATCH", api_path(f"{API}/apps", name), json_body=changes)

    def remove_app(self, name: str) -> Doc:
        return self.delete(api_path(f"{API}/apps", name))

    def protect(self, name: str, template: str) -> Doc:
        return self.post(api_path(f"{API}/apps", name, "protect"), {"template": template})

    def unprotect(self, name: str) -> Doc:
        return self.post(api_path(f"{API}/apps", name, "unprotect"))

    def transitions(self, name: str) -> Doc:
        return self.get(api_path(f"{API}/apps", name, "transitions"))

    # --- the other site -----------------------------------------------------------------

    def peers(self) -> Doc:
        return self.get(f"{API}/peers")

    def add_peer(self, url: str, token: str, fingerprint: str, bandwidth: int | None) -> Doc:
        body = {"url": url, "token": token, "fingerprint": fingerprint, "bandwidth": bandwidth}
        return self.post(f"{API}/peers", body)

    def remove_peer(self, name: str) -> Doc:
        return self.delete(api_path(f"{API}/peers", name))

    def info(self) -> Doc:
        """The appliance's name and version (what pairing reads first)."""
        return self.get(f"{API}/info")

    def accept_peer(self, name: str, url: str, fingerprint: str, token: str) -> Doc:
        """Pairing's second half, asked of the other appliance: it stores us as its peer."""
        body = {"name": name, "url": url, "fingerprint": fingerprint, "token": token}
        return self.post(f"{API}/peers/accept", body)
