"""The appliance's typed client for a host agent's API.

Invariants
- Every failure names the host as the operator registered it: a host that cannot be reached
  raises ``Unreachable`` ("host NAME unreachable at URL: ..."); a host that refuses the
  agent token raises ``RemoteError`` (never ``Unauthorized``, which would tell the API
  caller that *their* token is wrong).
- One method per call of the agent's API, taking the request model of
  ``transport.agent_api`` (the agent's routes declare the same models): a body is checked
  here before it is sent (a bad field is ``InvalidInput``) and again where it arrives.
- ``capture``/``restore`` yield the agent's NDJSON events as they arrive; an ``error`` event
  is raised as the ``TandemError`` class it names, with the agent's message. Closing the
  generator early closes the connection, which tells the agent to stop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from tandem import errors
from tandem.errors import RemoteError, TandemError, Unauthorized
from tandem.transport.agent_api import (
    ApplianceSession,
    CaptureRequest,
    DefineRequest,
    EmptyDomainRequest,
    MaterializeRequest,
    PgRunRequest,
    PowerRequest,
    ProbeRequest,
    RecoverRequest,
    RefreshRequest,
    RemoveRequest,
    RestoreRequest,
    RunRequest,
    StreamRequest,
    TakeOverRequest,
    TargetCheckRequest,
    UnmaterializeRequest,
    VmRestoreRequest,
    WalAck,
    WalListing,
    WalRead,
    WantedRequest,
)
from tandem.transport.api import checked
from tandem.transport.client import ApiClient, api_path


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

    def _call(self, method: str, path: str, body: BaseModel | None = None) -> Any:
        json_body = None if body is None else body.model_dump(mode="json", exclude_unset=True)
        try:
            return self._api.request(method, path, json_body=json_body)
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
        body = checked(RunRequest, script=script, env=env, timeout=timeout)
        answer = self._call("POST", "/api/v1/run", body)
        if not isinstance(answer, dict) or "returncode" not in answer:
            raise RemoteError(what="host", name=self.name, detail="unexpected answer to run")
        return answer

    def check_target(self, kind: str, path: str) -> dict[str, Any]:
        """What is at ``path`` on the host: ``{exists, empty, kind, usable}`` (``usable``: a
        new copy of a ``kind`` image may be written there). A symlink among the parent
        folders answers TargetInvalid."""
        body = checked(TargetCheckRequest, kind=kind, path=path)
        answer = self._call("POST", "/api/v1/target/check", body)
        if not isinstance(answer, dict) or "usable" not in answer:
            raise RemoteError(what="host", name=self.name, detail="unexpected answer to check")
        return answer

    def vms(self) -> list[dict[str, Any]]:
        """The libvirt domains of a hypervisor host (name, uuid, state, disks)."""
        answer = self._call("GET", "/api/v1/vms")
        if not isinstance(answer, dict) or not isinstance(answer.get("domains"), list):
            raise RemoteError(what="host", name=self.name, detail="unexpected answer to vms")
        return [d for d in answer["domains"] if isinstance(d, dict)]

    def define_vm(self, body: DefineRequest) -> dict[str, Any]:
        """Define a new VM from a VM image's XML over an NBD export (``agent.vm.define``)."""
        answer = self._call("POST", "/api/v1/vms/define", body)
        if not isinstance(answer, dict) or "name" not in answer:
            raise RemoteError(what="host", name=self.name, detail="unexpected answer to define")
        return answer

    def power_vm(self, name: str, *, on: bool, timeout: float = 120.0) -> dict[str, Any]:
        """Start domain ``name``, or stop it (graceful within ``timeout`` s, then destroy)."""
        body = checked(PowerRequest, name=name, on=on, timeout=timeout)
        answer = self._call("POST", "/api/v1/vms/power", body)
        if not isinstance(answer, dict) or "running" not in answer:
            raise RemoteError(what="host", name=self.name, detail="unexpected answer to power")
        return answer

    def vm_resources(self) -> dict[str, list[dict[str, Any]]]:
        """The storage pools (name, active, type, path) and networks (name, active) of a
        hypervisor host."""
        answer = self._call("GET", "/api/v1/vms/resources")
        if not isinstance(answer, dict) or not all(
            isinstance(answer.get(k), list) for k in ("pools", "networks")
        ):
            raise RemoteError(what="host", name=self.name, detail="unexpected answer to resources")
        return {
            k: [x for x in answer[k] if isinstance(x, dict) and isinstance(x.get("name"), str)]
            for k in ("pools", "networks")
        }

    def define_vm_copy(self, body: DefineRequest) -> Iterator[dict[str, Any]]:
        """Copy a VM image's disks into a pool of the host, then define the VM on them."""
        return self._events("/api/v1/vms/define-copy", body)

    def define_empty_vm(self, body: EmptyDomainRequest) -> dict[str, Any]:
        """Define a powered-off domain on new, empty volumes of a pool
        (``agent.vm.define_empty``): its name, uuid and volumes."""
        answer = self._call("POST", "/api/v1/vms/define-empty", body)
        if not isinstance(answer, dict) or "name" not in answer:
            raise RemoteError(what="host", name=self.name, detail="unexpected answer to define")
        return answer

    def remove_vm(self, name: str) -> dict[str, Any]:
        """Destroy and undefine the VM ``name`` (gone already is fine)."""
        answer = self._call("POST", "/api/v1/vms/remove", checked(RemoveRequest, name=name))
        return answer if isinstance(answer, dict) else {}

    def take_over_vm(self, body: TakeOverRequest) -> dict[str, Any]:
        """Power the existing domain ``body.name`` off and run it from a VM image's export,
        keeping its own definition (``agent.vm.take_over``)."""
        answer = self._call("POST", "/api/v1/vms/take-over", body)
        if not isinstance(answer, dict) or "name" not in answer:
            raise RemoteError(what="host", name=self.name, detail="unexpected answer to take-over")
        return answer

    def give_back_vm(self, name: str) -> dict[str, Any]:
        """Give the domain ``name`` its own definition back (``agent.vm.give_back``)."""
        answer = self._call("POST", "/api/v1/vms/give-back", checked(RemoveRequest, name=name))
        return answer if isinstance(answer, dict) else {}

    def _events(self, path: str, body: BaseModel) -> Iterator[dict[str, Any]]:
        json_body = body.model_dump(mode="json", exclude_unset=True)
        try:
            for event in self._api.stream(path, json_body):
                if event.get("event") == "error":
                    raise error_from_event(event, self.name)
                yield event
        except Unauthorized as exc:
            raise self._refused(exc) from exc

    def capture(self, body: CaptureRequest) -> Iterator[dict[str, Any]]:
        """Ask the agent to capture into an appliance session; yields progress events."""
        return self._events("/api/v1/capture", body)

    def restore(self, body: RestoreRequest) -> Iterator[dict[str, Any]]:
        """Ask the agent to diff-restore from an appliance session; yields progress events."""
        return self._events("/api/v1/restore", body)

    def restore_vm(self, body: VmRestoreRequest) -> Iterator[dict[str, Any]]:
        """Ask the agent to restore a VM image onto a domain in place; yields its events."""
        return self._events("/api/v1/vms/restore", body)

    def materialize(self, body: MaterializeRequest) -> Iterator[dict[str, Any]]:
        """Ask the agent to present an image at a mount point; yields progress events."""
        return self._events("/api/v1/materialize", body)

    def unmaterialize(self, image: str) -> dict[str, Any]:
        """Remove what presenting ``image`` placed on the host."""
        body = checked(UnmaterializeRequest, image=image)
        answer = self._call("POST", "/api/v1/unmaterialize", body)
        return answer if isinstance(answer, dict) else {}

    # --- PostgreSQL (``tandem.agent.pg``) ---------------------------------------------

    def _dict(self, method: str, path: str, body: BaseModel | None = None) -> dict[str, Any]:
        answer = self._call(method, path, body)
        if not isinstance(answer, dict):
            raise RemoteError(what="host", name=self.name, detail=f"unexpected answer to {path}")
        return answer

    def pg_probe(self, app: str, path: str) -> dict[str, Any]:
        """The cluster at ``path`` and whether it can be protected (refusals are errors)."""
        return self._dict("POST", "/api/v1/pg/probe", checked(ProbeRequest, app=app, path=path))

    def pg_stream(self, app: str, path: str) -> dict[str, Any]:
        """Keep the app's WAL receiver (and its replication slot) running."""
        return self._dict("POST", "/api/v1/pg/stream", checked(StreamRequest, app=app, path=path))

    def pg_drop(self, app: str, path: str) -> dict[str, Any]:
        """Stop the app's WAL receiver and drop its replication slot."""
        return self._dict("POST", "/api/v1/pg/drop", checked(StreamRequest, app=app, path=path))

    def pg_wal(self, app: str) -> WalListing:
        """The WAL files the host holds for ``app``, checked."""
        reply = self._dict("GET", api_path("/api/v1/pg/wal", app))
        try:
            return WalListing.model_validate(reply)
        except ValueError as exc:
            raise RemoteError(
                what="host", name=self.name, detail=f"its WAL listing is invalid ({exc})"
            ) from exc

    def pg_wal_read(self, app: str, name: str, offset: int) -> bytes:
        body = checked(WalRead, app=app, name=name, offset=offset).model_dump(mode="json")
        try:
            data = self._api.request("POST", "/api/v1/pg/wal/read", json_body=body, raw=True)
        except Unauthorized as exc:
            raise self._refused(exc) from exc
        return bytes(data)

    def pg_wal_ack(self, app: str, names: list[str]) -> dict[str, Any]:
        return self._dict("POST", "/api/v1/pg/wal/ack", checked(WalAck, app=app, names=names))

    def pg_spool(self, path: str, name: str, data: bytes, run: str | None = None) -> dict[str, Any]:
        """Give the copy at ``path`` one WAL segment for its recovery (``run``: its folder)."""
        params = {"path": path, "name": name, **({"run": run} if run else {})}
        try:
            answer = self._api.request("PUT", "/api/v1/pg/spool", content=data, params=params)
        except Unauthorized as exc:
            raise self._refused(exc) from exc
        return answer if isinstance(answer, dict) else {}

    def pg_spool_wanted(
        self, path: str, after: str | None, wait: float, run: str | None = None
    ) -> str | None:
        """The segment the recovery of the copy at ``path`` waits for (None: none yet);
        the agent waits up to ``wait`` s for it to differ from ``after``."""
        body = checked(WantedRequest, path=path, after=after, wait=wait, run=run)
        answer = self._dict("POST", "/api/v1/pg/spool/wanted", body)
        wanted = answer.get("wanted")
        return str(wanted) if isinstance(wanted, str) else None

    def pg_stop(self, path: str) -> bool:
        """Stop the PostgreSQL running on the cluster at ``path`` (fast shutdown); False when
        none ran."""
        answer = self._dict("POST", "/api/v1/pg/stop", checked(PgRunRequest, path=path))
        return bool(answer.get("stopped"))

    def pg_start(self, path: str, port: int | None, socket_dir: str | None) -> dict[str, Any]:
        """Start the presented copy at ``path`` again (after a failback was undone)."""
        body = checked(PgRunRequest, path=path, port=port, socket_dir=socket_dir)
        return self._dict("POST", "/api/v1/pg/start", body)

    def pg_recover(self, body: RecoverRequest) -> dict[str, Any]:
        """Start the copy recovered to a point in time; answers the point reached."""
        return self._dict("POST", "/api/v1/pg/recover", body)

    def refresh_layers(self, image: str, appliance: ApplianceSession) -> int:
        """Give the FUSE copies of ``image`` on the host a new read session; how many."""
        body = checked(RefreshRequest, image=image, appliance=appliance)
        answer = self._call("POST", "/api/v1/layers/refresh", body)
        return int(answer.get("refreshed") or 0) if isinstance(answer, dict) else 0
