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

    def run(self, command: str, timeout: float = 600.0) -> dict[str, Any]:
        """Run a shell command on the host; returns ``{returncode, stdout, stderr}``."""
        answer = self._call("POST", "/api/v1/run", {"command": command, "timeout": timeout})
        if not isinstance(answer, dict) or "returncode" not in answer:
            raise RemoteError(what="host", name=self.name, detail="unexpected answer to run")
        return answer

    def stat(self, path: str) -> dict[str, Any]:
        """What ``path`` holds on the host: ``{exists, type, empty}``."""
        answer = self._call("POST", "/api/v1/stat", {"path": path})
        if not isinstance(answer, dict) or "empty" not in answer:
            raise RemoteError(what="host", name=self.name, detail="unexpected answer to stat")
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
