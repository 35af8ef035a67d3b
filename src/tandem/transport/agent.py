"""The appliance's typed client for a host agent's API.

Invariants
- Every failure names the host as the operator registered it: a host that cannot be reached
  raises ``Unreachable`` ("host NAME unreachable at URL: ..."); a host that refuses the
  agent token raises ``RemoteError`` (never ``Unauthorized``, which would tell the API
  caller that *their* token is wrong).
- ``capture``/``restore`` yield the agent's NDJSON events as they arrive; an ``error`` event
  is raised as the ``TandemError`` class it names, with the agent's message. Closing the
  generator early closes the connection, which tells the agent to stop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tandem import errors
from tandem.errors import RemoteError, TandemError, Unauthorized
from tandem.transport.client import ApiClient


def error_from_event(event: dict[str, Any], host: str) -> TandemError:
    """The error an agent reported in an ``{"event": "error", ...}`` event."""
    code, message = str(event.get("error", "")), str(event.get("message", "unknown error"))
    cls = getattr(errors, code, None)
    if isinstance(cls, type) and issubclass(cls, TandemError) and cls is not Unauthorized:
        return cls(message)
    return RemoteError(what="host", name=host, detail=message)


class AgentClient:
    """A connection to the agent of one registered host."""

    def __init__(self, name: str, url: str, token: str, fingerprint: str) -> None:
        self.name = name
        self.url = url
        self._api = ApiClient(url, token, fingerprint, what="host", name=name)

    def close(self) -> None:
        self._api.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refused(self, exc: Unauthorized) -> RemoteError:
        return RemoteError(
            what="host",
            name=self.name,
            detail=(
                f"its agent at {self.url} refused the agent token ({exc.message}). Register the "
                "host again with the token `tandem agent init` printed"
            ),
        )

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            return self._api.request(method, path, json_body=body)
        except Unauthorized as exc:
            raise self._refused(exc) from exc

    def info(self) -> dict[str, Any]:
        """The agent's identity (name, hostname, version); proves it answers."""
        answer = self._call("GET", "/api/v1/info")
        if not isinstance(answer, dict):
            raise RemoteError(what="host", name=self.name, detail="unexpected answer to info")
        return answer

    def run_hook(self, script: str, env: dict[str, str], timeout: float = 600.0) -> dict[str, Any]:
        """Run the hook script named ``script`` from the agent's scripts/ folder with the
        ``TANDEM_*`` variables ``env``; returns ``{returncode, stdout, stderr}``."""
        body = {"script": script, "env": env, "timeout": timeout}
        answer = self._call("POST", "/api/v1/run", body)
        if not isinstance(answer, dict) or "returncode" not in answer:
            raise RemoteError(what="host", name=self.name, detail="unexpected answer to run")
        return answer

    def check_target(self, kind: str, path: str) -> dict[str, Any]:
        """What is at ``path`` on the host: ``{exists, empty, kind, usable}`` (``usable``: a
        new copy of a ``kind`` image may be written there). A symlink among the parent
        folders answers TargetInvalid."""
        answer = self._call("POST", "/api/v1/target/check", {"kind": kind, "path": path})
        if not isinstance(answer, dict) or "usable" not in answer:
            raise RemoteError(what="host", name=self.name, detail="unexpected answer to check")
        return answer

    def _events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            for event in self._api.stream(path, body):
                if event.get("event") == "error":
                    raise error_from_event(event, self.name)
                yield event
        except Unauthorized as exc:
            raise self._refused(exc) from exc

    def capture(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Ask the agent to capture into an appliance session; yields progress events."""
        return self._events("/api/v1/capture", body)

    def restore(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Ask the agent to diff-restore from an appliance session; yields progress events."""
        return self._events("/api/v1/restore", body)

    def materialize(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Ask the agent to present an image at a mount point; yields progress events."""
        return self._events("/api/v1/materialize", body)

    def unmaterialize(self, image: str) -> dict[str, Any]:
        """Remove what presenting ``image`` placed on the host."""
        answer = self._call("POST", "/api/v1/unmaterialize", {"image": image})
        return answer if isinstance(answer, dict) else {}

    def refresh_layers(self, image: str, appliance: dict[str, str]) -> int:
        """Give the FUSE copies of ``image`` on the host a new read session; how many."""
        answer = self._call(
            "POST", "/api/v1/layers/refresh", {"image": image, "appliance": appliance}
        )
        return int(answer.get("refreshed") or 0) if isinstance(answer, dict) else 0
