"""Set-up commands: tokens, hosts, templates, applications (CLI.md "Set-up")."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tandem.domain.consistency import ConsistencyMode
from tandem.errors import OptionsMissing
from tandem.transport.api import AppHooksIn, AppIn, HostIn, ProtectIn, TemplateIn, TokenIn, checked

from .common import APPLIANCE_FLAGS, Name, Session, api_command, table_of
from .output import stdout

if TYPE_CHECKING:  # Rich is imported when a table is made (tandem.cli.output)
    from rich.table import Table

token_app = typer.Typer(no_args_is_help=True, help="API tokens (admin).")
host_app = typer.Typer(no_args_is_help=True, help="Hosts: machines with a host agent.")
template_app = typer.Typer(no_args_is_help=True, help="Backup templates.")
app_app = typer.Typer(no_args_is_help=True, help="Applications to protect.")


class RoleChoice(StrEnum):
    admin = "admin"
    operator = "operator"
    viewer = "viewer"


class KindChoice(StrEnum):
    filesystem = "filesystem"
    volume = "volume"
    postgresql = "postgresql"
    vm = "vm"


# --- tokens -------------------------------------------------------------------------------


@token_app.command("add")
@api_command
def token_add(
    s: Session,
    name: Name,
    role: Annotated[RoleChoice, typer.Option("--role", help="What the token may do.")],
) -> None:
    """Create an API token; it is shown once."""
    s.show(s.api.add_token(checked(TokenIn, name=name, role=role.value)), ("name", "role", "token"))
    if not s.json:
        stdout.print("Keep the token: it is shown only once.")


@token_app.command("list")
@api_command
def token_list(s: Session) -> None:
    """The API tokens (names and roles, never the secrets)."""
    s.table(s.api.tokens(), ("name", "role", "created"))


@token_app.command("remove")
@api_command
def token_remove(s: Session, name: Name) -> None:
    """Remove an API token: it stops working at once."""
    s.show(s.api.remove_token(name), ("deleted",))


# --- hosts --------------------------------------------------------------------------------


@host_app.command("add")
@api_command(flags=APPLIANCE_FLAGS)
def host_add(
    s: Session,
    name: Name,
    agent_url: Annotated[str, typer.Option("--url", help="The agent's URL.")],
    agent_token: Annotated[str, typer.Option("--token", help="The agent's token.")],
    agent_fingerprint: Annotated[
        str, typer.Option("--fingerprint", help="The agent's certificate fingerprint.")
    ],
) -> None:
    """Register a host; the appliance checks that its agent answers.

    --url, --token and --fingerprint are the agent's (as `tandem agent init` printed them);
    the appliance comes from TANDEM_URL, TANDEM_TOKEN and TANDEM_FINGERPRINT.
    """
    body = checked(
        HostIn, name=name, url=agent_url, token=agent_token, fingerprint=agent_fingerprint
    )
    doc = s.api.add_host(body)
    s.show(doc, ("name", "url", "fingerprint"))


@host_app.command("remove")
@api_command
def host_remove(s: Session, name: Name) -> None:
    """Unregister a host that no application runs on."""
    s.show(s.api.remove_host(name), ("deleted",))


@api_command
def hosts(s: Session) -> None:
    """The registered hosts."""
    s.table(s.api.hosts(), ("name", "url", "fingerprint"))


@api_command
def vms(
    s: Session,
    host: Annotated[str, typer.Option("--host", help="A hypervisor (libvirt) host.")],
) -> None:
    """The libvirt domains of a hypervisor host: name, uuid, state, disks."""
    domains = s.api.vms(host).get("domains", [])
    if s.json:
        s.table(domains, ())
        return
    rows = [
        {**d, "disks": ", ".join(f"{x['target']} ({x['format']})" for x in d.get("disks", []))}
        for d in domains
    ]
    s.table(rows, ("name", "uuid", "state", "disks"))


# --- templates ----------------------------------------------------------------------------

TEMPLATE_KEYS = ("name", "every", "keep", "mirror", "max_lag")


@template_app.command("add")
@api_command
def template_add(
    s: Session,
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
) -> None:
    """Create a backup template."""
    params = {"name": name, "every": every, "keep": keep, "mirror": mirror, "max_lag": max_lag}
    s.show(s.api.add_template(checked(TemplateIn, **params)), TEMPLATE_KEYS)


@template_app.command("remove")
@api_command
def template_remove(s: Session, name: Name) -> None:
    """Remove a template that no application uses."""
    s.show(s.api.remove_template(name), ("deleted",))


@api_command
def templates(s: Session) -> None:
    """The backup templates."""
    s.table(s.api.templates(), TEMPLATE_KEYS)


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
@api_command
def app_add(
    s: Session,
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
) -> None:
    """Add an application to protect (hooks need an admin token)."""
    hooks = {"start": start, "stop": stop, "freeze": freeze, "thaw": thaw}
    params: dict[str, str | None] = {
        "name": name,
        "host": host,
        "kind": kind.value,
        **({"domain": domain} if domain else {}),
        **({"path": path} if path else {}),
        **hooks,
    }
    if consistency is not None:
        params["consistency"] = consistency.value
    s.show(s.api.add_app(checked(AppIn, **params)), (*APP_KEYS, "consistency", *_given(hooks)))


@app_app.command("set")
@api_command
def app_set(
    s: Session,
    name: Name,
    start: StartHook = None,
    stop: StopHook = None,
    freeze: FreezeHook = None,
    thaw: ThawHook = None,
    consistency: Consistency = None,
) -> None:
    """Change an application's hooks: scripts by name ("" removes one; needs an admin token),
    and what its captures are cut from (--consistency)."""
    changes = _given({"start": start, "stop": stop, "freeze": freeze, "thaw": thaw})
    if consistency is not None:
        changes["consistency"] = consistency.value
    if not changes:
        raise OptionsMissing(
            what="`tandem app set`",
            options="--start, --stop, --freeze, --thaw and/or --consistency",
            why="",
        )
    s.show(
        s.api.set_app(name, checked(AppHooksIn, **changes)), (*APP_KEYS, "consistency", *HOOK_KEYS)
    )


@app_app.command("show")
@api_command
def app_show(s: Session, name: Name) -> None:
    """An application: where it is, its state and its newest capture."""
    s.show(s.api.app(name), (*APP_KEYS, *HOOK_KEYS, "epoch"))


@app_app.command("protect")
@api_command
def app_protect(
    s: Session,
    name: Name,
    template: Annotated[str, typer.Option("--template", help="The template to apply.")],
) -> None:
    """Apply a template: the application becomes managed."""
    s.show(s.api.protect(name, checked(ProtectIn, template=template)), APP_KEYS)


@app_app.command("unprotect")
@api_command
def app_unprotect(s: Session, name: Name) -> None:
    """Stop protecting an application (its images stay)."""
    s.show(s.api.unprotect(name), APP_KEYS)


@app_app.command("remove")
@api_command
def app_remove(s: Session, name: Name) -> None:
    """Remove an unprotected application that has no images left."""
    done = s.api.remove_app(name)
    s.show(done, ("deleted", "note") if done.note else ("deleted",))


@app_app.command("history")
@api_command
def app_history(s: Session, name: Name) -> None:
    """An application's lifecycle transitions, oldest first."""
    s.table(s.api.transitions(name), ("ts", "operation", "from_state", "to_state", "actor", "job"))


def apps_table(rows: list[dict[str, Any]]) -> Table:
    """The applications as people read them: lag, risk, where a failed-over app runs."""
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
    return table_of(rows, ("name", "kind", "host", "state", "template", "lag", "risk", "path"))


@api_command
def apps(s: Session) -> None:
    """The applications, with their state and template."""
    s.emit(s.api.apps(), apps_table)


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
