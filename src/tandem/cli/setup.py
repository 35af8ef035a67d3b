"""Set-up commands: tokens, hosts, templates, applications (CLI.md "Set-up")."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from tandem.domain.consistency import ConsistencyMode
from tandem.errors import InvalidInput

from .common import (
    ApplianceFingerprint,
    ApplianceToken,
    ApplianceUrl,
    Fingerprint,
    Json,
    Token,
    Url,
    connect,
)
from .output import emit_json, handle_errors, stdout

token_app = typer.Typer(no_args_is_help=True, help="API tokens (admin).")
host_app = typer.Typer(no_args_is_help=True, help="Hosts: machines with a host agent.")
template_app = typer.Typer(no_args_is_help=True, help="Backup templates.")
app_app = typer.Typer(no_args_is_help=True, help="Applications to protect.")

Name = Annotated[str, typer.Argument(help="Its name.", metavar="NAME")]


class RoleChoice(StrEnum):
    admin = "admin"
    operator = "operator"
    viewer = "viewer"


class KindChoice(StrEnum):
    filesystem = "filesystem"
    volume = "volume"
    vm = "vm"


def _show(doc: Any, json_: bool, keys: tuple[str, ...]) -> None:
    if json_:
        emit_json(doc)
        return
    for key in keys:
        value = doc.get(key)
        stdout.print(f"{key:13} {'' if value is None else value}", highlight=False)


def _table(rows: list[dict[str, Any]], keys: tuple[str, ...], json_: bool) -> None:
    if json_:
        emit_json(rows)
        return
    table = Table(box=box.SIMPLE_HEAD)
    for key in keys:
        table.add_column(key, no_wrap=key in ("name", "id"), overflow="fold")
    for row in rows:
        table.add_row(*("" if row.get(k) is None else str(row.get(k)) for k in keys))
    stdout.print(table)


# --- tokens -------------------------------------------------------------------------------


@token_app.command("add")
@handle_errors
def token_add(
    name: Name,
    role: Annotated[RoleChoice, typer.Option("--role", help="What the token may do.")],
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Create an API token; it is shown once."""
    with connect(url, token, fingerprint) as client:
        doc = client.post("/api/v1/tokens", {"name": name, "role": role.value})
    _show(doc, json_, ("name", "role", "token"))
    if not json_:
        stdout.print("Keep the token: it is shown only once.")


@token_app.command("list")
@handle_errors
def token_list(
    url: Url = None, token: Token = None, fingerprint: Fingerprint = None, json_: Json = False
) -> None:
    """The API tokens (names and roles, never the secrets)."""
    with connect(url, token, fingerprint) as client:
        _table(client.get("/api/v1/tokens"), ("name", "role", "created"), json_)


@token_app.command("remove")
@handle_errors
def token_remove(
    name: Name,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Remove an API token: it stops working at once."""
    with connect(url, token, fingerprint) as client:
        _show(client.delete(f"/api/v1/tokens/{name}"), json_, ("deleted",))


# --- hosts --------------------------------------------------------------------------------


@host_app.command("add")
@handle_errors
def host_add(
    name: Name,
    agent_url: Annotated[str, typer.Option("--url", help="The agent's URL.")],
    agent_token: Annotated[str, typer.Option("--token", help="The agent's token.")],
    agent_fingerprint: Annotated[
        str, typer.Option("--fingerprint", help="The agent's certificate fingerprint.")
    ],
    url: ApplianceUrl = None,
    token: ApplianceToken = None,
    fingerprint: ApplianceFingerprint = None,
    json_: Json = False,
) -> None:
    """Register a host; the appliance checks that its agent answers.

    --url, --token and --fingerprint are the agent's (as `tandem agent init` printed them);
    the appliance comes from TANDEM_URL, TANDEM_TOKEN and TANDEM_FINGERPRINT.
    """
    body = {"name": name, "url": agent_url, "token": agent_token, "fingerprint": agent_fingerprint}
    with connect(url, token, fingerprint) as client:
        _show(client.post("/api/v1/hosts", body), json_, ("name", "url", "fingerprint"))


@host_app.command("remove")
@handle_errors
def host_remove(
    name: Name,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Unregister a host that no application runs on."""
    with connect(url, token, fingerprint) as client:
        _show(client.delete(f"/api/v1/hosts/{name}"), json_, ("deleted",))


@handle_errors
def hosts(
    url: Url = None, token: Token = None, fingerprint: Fingerprint = None, json_: Json = False
) -> None:
    """The registered hosts."""
    with connect(url, token, fingerprint) as client:
        _table(client.get("/api/v1/hosts"), ("name", "url", "fingerprint"), json_)


@handle_errors
def vms(
    host: Annotated[str, typer.Option("--host", help="A hypervisor (libvirt) host.")],
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """The libvirt domains of a hypervisor host: name, uuid, state, disks."""
    with connect(url, token, fingerprint) as client:
        doc = client.get(f"/api/v1/hosts/{host}/vms")
    rows = [
        {**d, "disks": ", ".join(f"{x['target']} ({x['format']})" for x in d.get("disks", []))}
        for d in doc.get("domains", [])
    ]
    if json_:
        _table(doc.get("domains", []), (), True)
    else:
        _table(rows, ("name", "uuid", "state", "disks"), False)


# --- templates ----------------------------------------------------------------------------


@template_app.command("add")
@handle_errors
def template_add(
    name: Name,
    every: Annotated[
        str | None, typer.Option("--every", help="Capture interval: 30s, 15m, 1h, 1d…")
    ] = None,
    keep: Annotated[
        int | None, typer.Option("--keep", help="Snapshots to keep (older ones are pruned).")
    ] = None,
    mirror: Annotated[
        bool, typer.Option("--mirror", help="Replicate each capture to the peer.")
    ] = False,
    max_lag: Annotated[
        str | None,
        typer.Option(
            "--max-lag", help="RPO past which its apps are shown at risk: 15m, 1h… (none)."
        ),
    ] = None,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Create a backup template."""
    body = {"name": name, "every": every, "keep": keep, "mirror": mirror, "max_lag": max_lag}
    with connect(url, token, fingerprint) as client:
        _show(
            client.post("/api/v1/templates", body),
            json_,
            ("name", "every", "keep", "mirror", "max_lag"),
        )


@template_app.command("remove")
@handle_errors
def template_remove(
    name: Name,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Remove a template that no application uses."""
    with connect(url, token, fingerprint) as client:
        _show(client.delete(f"/api/v1/templates/{name}"), json_, ("deleted",))


@handle_errors
def templates(
    url: Url = None, token: Token = None, fingerprint: Fingerprint = None, json_: Json = False
) -> None:
    """The backup templates."""
    with connect(url, token, fingerprint) as client:
        _table(
            client.get("/api/v1/templates"), ("name", "every", "keep", "mirror", "max_lag"), json_
        )


# --- applications -------------------------------------------------------------------------

APP_KEYS = ("name", "kind", "host", "path", "state", "template", "last_capture", "lag_seconds")
HOOK_KEYS = ("start", "stop", "freeze", "thaw")
_HOOK_HELP = (
    "Hook: the name of a script in the host agent's scripts/ folder that {what}, run as root "
    "with TANDEM_* variables (admin only)."
)
StartHook = Annotated[
    str | None,
    typer.Option("--start", help=_HOOK_HELP.format(what="starts the app"), metavar="SCRIPT"),
]
StopHook = Annotated[
    str | None,
    typer.Option("--stop", help=_HOOK_HELP.format(what="stops the app"), metavar="SCRIPT"),
]
FreezeHook = Annotated[
    str | None,
    typer.Option(
        "--freeze", help=_HOOK_HELP.format(what="quiesces the app for a capture"), metavar="SCRIPT"
    ),
]
ThawHook = Annotated[
    str | None,
    typer.Option(
        "--thaw", help=_HOOK_HELP.format(what="resumes it after the capture"), metavar="SCRIPT"
    ),
]


Consistency = Annotated[
    ConsistencyMode | None,
    typer.Option(
        "--consistency",
        help="What captures are cut from: auto (default: a btrfs snapshot or reflink clones "
        "when the host's file system has them, else live files checked after reading), "
        "snapshot (those or fail), freeze (fsfreeze during the capture), hooks (the "
        "--freeze/--thaw scripts around it) or none (live files, checked).",
    ),
]


def _given(hooks: dict[str, str | None]) -> dict[str, str]:
    """The hooks given on the command line (an empty name is given: it removes the hook)."""
    return {k: v for k, v in hooks.items() if v is not None}


@app_app.command("add")
@handle_errors
def app_add(
    name: Name,
    host: Annotated[str, typer.Option("--host", help="The host it runs on.")],
    kind: Annotated[KindChoice, typer.Option("--kind", help="What its data is.")],
    path: Annotated[
        str | None, typer.Option("--path", help="Its directory or volume on the host.")
    ] = None,
    domain: Annotated[
        str | None, typer.Option("--domain", help="A vm app's libvirt domain (`tandem vms`).")
    ] = None,
    start: StartHook = None,
    stop: StopHook = None,
    freeze: FreezeHook = None,
    thaw: ThawHook = None,
    consistency: Consistency = None,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Add an application to protect (hooks need an admin token)."""
    hooks = {"start": start, "stop": stop, "freeze": freeze, "thaw": thaw}
    body: dict[str, str | None] = {
        "name": name,
        "host": host,
        "kind": kind.value,
        **({"domain": domain} if domain else {}),
        **({"path": path} if path else {}),
        **hooks,
    }
    if consistency is not None:
        body["consistency"] = consistency.value
    with connect(url, token, fingerprint) as client:
        answer = client.post("/api/v1/apps", body)
        _show(answer, json_, (*APP_KEYS, "consistency", *_given(hooks)))


@app_app.command("set")
@handle_errors
def app_set(
    name: Name,
    start: StartHook = None,
    stop: StopHook = None,
    freeze: FreezeHook = None,
    thaw: ThawHook = None,
    consistency: Consistency = None,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Change an application's hooks: scripts by name ("" removes one; needs an admin token),
    and what its captures are cut from (--consistency)."""
    body = _given({"start": start, "stop": stop, "freeze": freeze, "thaw": thaw})
    if consistency is not None:
        body["consistency"] = consistency.value
    if not body:
        raise InvalidInput(detail="give --start, --stop, --freeze, --thaw and/or --consistency")
    with connect(url, token, fingerprint) as client:
        answer = client.request("PATCH", f"/api/v1/apps/{name}", json_body=body)
        _show(answer, json_, (*APP_KEYS, "consistency", *HOOK_KEYS))


@app_app.command("show")
@handle_errors
def app_show(
    name: Name,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """An application: where it is, its state and its newest capture."""
    with connect(url, token, fingerprint) as client:
        _show(client.get(f"/api/v1/apps/{name}"), json_, (*APP_KEYS, *HOOK_KEYS, "epoch"))


@app_app.command("protect")
@handle_errors
def app_protect(
    name: Name,
    template: Annotated[str, typer.Option("--template", help="The template to apply.")],
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Apply a template: the application becomes managed."""
    with connect(url, token, fingerprint) as client:
        doc = client.post(f"/api/v1/apps/{name}/protect", {"template": template})
    _show(doc, json_, APP_KEYS)


@app_app.command("unprotect")
@handle_errors
def app_unprotect(
    name: Name,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Stop protecting an application (its images stay)."""
    with connect(url, token, fingerprint) as client:
        _show(client.post(f"/api/v1/apps/{name}/unprotect"), json_, APP_KEYS)


@app_app.command("remove")
@handle_errors
def app_remove(
    name: Name,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Remove an unprotected application that has no images left."""
    with connect(url, token, fingerprint) as client:
        _show(client.delete(f"/api/v1/apps/{name}"), json_, ("deleted",))


@app_app.command("history")
@handle_errors
def app_history(
    name: Name,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """An application's lifecycle transitions, oldest first."""
    with connect(url, token, fingerprint) as client:
        rows = client.get(f"/api/v1/apps/{name}/transitions")
    _table(rows, ("ts", "operation", "from_state", "to_state", "actor", "job"), json_)


@handle_errors
def apps(
    url: Url = None, token: Token = None, fingerprint: Fingerprint = None, json_: Json = False
) -> None:
    """The applications, with their state and template."""
    with connect(url, token, fingerprint) as client:
        rows = client.get("/api/v1/apps")
    if json_:
        emit_json(rows)
        return
    for row in rows:
        lag = row.get("lag_seconds")
        row["lag"] = None if lag is None else f"{lag:.0f} s"
        rpo, limit = row.get("rpo_seconds"), row.get("max_lag_seconds")
        if row.get("at_risk"):
            row["risk"] = f"AT RISK ({_age(rpo)} > {_age(limit)})"
        elif limit is not None:
            row["risk"] = f"ok (≤ {_age(limit)})"
        if row.get("peer_active"):
            at = row.get("failed_over_at") or "the peer"
            row["state"] = f"{row['state']} (failed over at {at})"
        elif row.get("origin"):
            row["host"] = f"({row['host']} at {row['origin']})" if row.get("host") else None
    _table(rows, ("name", "kind", "host", "state", "template", "lag", "risk", "path"), False)


def _age(seconds: float | None) -> str:
    """``seconds`` as the largest whole units (``930`` -> ``15m30s``); ``never`` for None."""
    if seconds is None:
        return "never"
    whole, out = int(seconds), ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            n, whole = divmod(whole, size)
            out += f"{n}{unit}"
    return out or "0s"
