"""`tandem appliance …` and `tandem agent …`: create and run the daemons."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import Json, json_mode
from .output import emit_json, handle_errors, stdout

appliance_app = typer.Typer(no_args_is_help=True, help="Create and run an appliance.")
agent_app = typer.Typer(no_args_is_help=True, help="Create and run a host agent.")

Dir = Annotated[Path, typer.Argument(help="The daemon's directory.")]
Name = Annotated[str, typer.Option("--name", help="Its name (unique per site).")]


def _print_init(doc: dict[str, str], json_: bool) -> None:
    if json_mode(json_):
        emit_json(doc)
        return
    for key in ("name", "url", "token", "fingerprint", "scripts"):
        if key in doc:
            stdout.print(f"{key:12} {doc[key]}")
    stdout.print("Keep the token: it is shown only once.")


@appliance_app.command("init")
@handle_errors
def appliance_init(
    directory: Dir,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Its name (unique per site). Required unless --join gives it."),
    ] = None,
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve on.")] = "127.0.0.1:8443",
    catalog: Annotated[
        str | None, typer.Option(help="Catalog URL (default: SQLite in DIR).")
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            help="Where the chunk pool lives (default: DIR/pool): a directory, or an "
            "S3-compatible store as s3://BUCKET[/PREFIX]?endpoint=http(s)://HOST:PORT, its "
            "credentials read from TANDEM_S3_ACCESS_KEY and TANDEM_S3_SECRET_KEY."
        ),
    ] = None,
    nbd_listen: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT to serve NBD exports on (default: a free port on --listen's "
            "host). Any address but loopback serves NBD over TLS only (nbds://)."
        ),
    ] = None,
    nbd_tls: Annotated[
        bool, typer.Option("--nbd-tls", help="Serve NBD over TLS on loopback too.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(help="Jobs run at once (default 4); scheduled captures queue to match."),
    ] = None,
    join: Annotated[
        Path | None,
        typer.Option(
            help="The directory of the first process of an appliance whose catalog is "
            "PostgreSQL: DIR becomes another process of it (same name, catalog and pool; "
            "its own --listen, certificate and admin token)."
        ),
    ] = None,
    json_: Json = False,
) -> None:
    """Create an appliance in DIR; prints its URL, admin token and fingerprint."""
    from tandem.appliance import daemon

    if join is not None:
        if catalog is not None or pool is not None or nbd_listen is not None or nbd_tls:
            raise typer.BadParameter(
                "a joined process takes the catalog and pool of the one it joins and serves "
                "no NBD: leave out --catalog, --pool, --nbd-listen and --nbd-tls",
                param_hint="'--join'",
            )
        doc = daemon.join(directory, join, listen, name=name, workers=workers)
        _print_init(doc, json_)
        return
    if name is None:
        raise typer.BadParameter("give the appliance a name (or --join DIR)", param_hint="'--name'")
    doc = daemon.init(
        directory,
        name,
        listen,
        catalog,
        nbd_listen=nbd_listen,
        nbd_tls=nbd_tls,
        workers=workers,
        pool=pool,
    )
    _print_init(doc, json_)


@appliance_app.command("serve")
@handle_errors
def appliance_serve(directory: Dir) -> None:
    """Run the appliance until SIGTERM/SIGINT."""
    from tandem.appliance import daemon

    daemon.run_forever(directory)


@agent_app.command("init")
@handle_errors
def agent_init(
    directory: Dir,
    name: Name,
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve on.")] = "127.0.0.1:8444",
    json_: Json = False,
) -> None:
    """Create a host agent in DIR; prints its URL, token and fingerprint.

    DIR/scripts/ is the only place hook scripts run from (`tandem app set APP --stop SCRIPT`).
    """
    from tandem.agent import app as agent

    _print_init(agent.init(directory, name, listen), json_)


@agent_app.command("serve")
@handle_errors
def agent_serve(directory: Dir) -> None:
    """Run the host agent until SIGTERM/SIGINT."""
    from tandem.agent import app as agent

    agent.run_forever(directory)


@agent_app.command("release")
@handle_errors
def agent_release(directory: Dir, json_: Json = False) -> None:
    """Take down every file-tree copy the agent in DIR presents through FUSE, even in use.

    Presented copies outlive the agent (a restart keeps the applications' files); use this
    when decommissioning the host or ending a lab. `tandem unmount IMAGE` is the normal way.
    """
    from tandem.agent import fusemount

    released = fusemount.release_all(directory)
    if json_mode(json_):
        emit_json({"released": released})
        return
    for point in released:
        stdout.print(f"released {point}")
