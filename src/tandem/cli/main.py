"""Entry point of the `tandem` command.

Usage errors (unknown command or option, missing argument) are one line on stderr with exit
status 2, like every other error (CLI.md); ``tandem`` alone, or a group alone, prints help.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

# typer 0.29 vendors click; its usage errors live in this (private) module.
from typer._click.exceptions import NoArgsIsHelpError, UsageError

from tandem.cli.common import root_options
from tandem.cli.output import fail

# Every command: name -> (module under tandem.cli, attribute, "group" or "command"). A run
# imports only the module of the command it was given (all of them for help or an unknown
# name): each `tandem` call is a new process, and the storage engine, the demo and the
# daemons' imports would otherwise slow every API command down.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "storage": ("storage", "app", "group"),
    "appliance": ("daemons", "appliance_app", "group"),
    "agent": ("daemons", "agent_app", "group"),
    "demo": ("demo", "demo", "command"),
    # Set-up (CLI.md): groups for one thing, plural commands for the lists.
    "token": ("setup", "token_app", "group"),
    "host": ("setup", "host_app", "group"),
    "template": ("setup", "template_app", "group"),
    "app": ("setup", "app_app", "group"),
    "hosts": ("setup", "hosts", "command"),
    "vms": ("setup", "vms", "command"),
    "templates": ("setup", "templates", "command"),
    "apps": ("setup", "apps", "command"),
    # Lifecycle and the Monitor.
    "capture": ("ops", "capture", "command"),
    "restore": ("ops", "restore", "command"),
    "images": ("ops", "images", "command"),
    "image": ("ops", "image_app", "group"),
    "jobs": ("jobs", "jobs", "command"),
    "job": ("jobs", "job_app", "group"),
    "audit": ("ops", "audit", "command"),
    "gc": ("jobs", "gc", "command"),
    # The other site.
    "peer": ("peers", "peer_app", "group"),
    "peers": ("peers", "peer_list", "command"),
    "replicate": ("peers", "replicate", "command"),
    "test-failover": ("dr", "test_failover", "command"),
    "failover": ("dr", "failover", "command"),
    "mount": ("dr", "mount", "command"),
    "unmount": ("dr", "unmount", "command"),
    "syncback": ("dr", "syncback", "command"),
    "failback": ("dr", "failback", "command"),
    "clone": ("dr", "clone", "command"),
    "commit-failback": ("dr", "commit_failback", "command"),
    "undo-failback": ("dr", "undo_failback", "command"),
}


ROOT_VALUED = ("--url", "--token", "--fingerprint")

# The modules of the commands that only talk to the appliance: once one has printed, its
# process holds nothing to finish (its client is closed), so it ends at once (``run``).
API_MODULES = frozenset({"setup", "ops", "jobs", "peers", "dr"})


def command_name(args: list[str]) -> str | None:
    """The command ``args`` run: the first word after the root options (``tandem --url U
    --json apps`` runs ``apps``)."""
    rest = iter(args)
    for arg in rest:
        if arg in ROOT_VALUED:
            next(rest, None)
        elif arg != "--json" and not arg.startswith(tuple(f"{o}=" for o in ROOT_VALUED)):
            return arg
    return None


def build_app(only: str | None = None) -> typer.Typer:
    """The `tandem` command with every subcommand, or just ``only`` when it names one."""
    app = typer.Typer(
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        help="tandem: two-site disaster recovery.",
    )
    # The root callback takes where the appliance is (and --json) before the command; it
    # also keeps typer from promoting a lone command to the whole program.
    app.callback()(root_options)
    names = [only] if only in COMMANDS else list(COMMANDS)
    for name in names:
        module, attr, kind = COMMANDS[name]
        target = getattr(importlib.import_module(f"tandem.cli.{module}"), attr)
        if kind == "group":
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
    return app


def main() -> None:
    args = sys.argv[1:]
    command = typer.main.get_command(build_app(command_name(args)))
    try:
        code = command.main(args=args, prog_name="tandem", standalone_mode=False)
    except NoArgsIsHelpError:
        # A bare group: show its help (typer renders it) rather than an error line.
        command.main(args=[*args, "--help"], prog_name="tandem")
        return
    except UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        sys.exit(fail(f"{exc.format_message()}{hint}", 2).exit_code)
    except typer.TyperException as exc:
        sys.exit(fail(exc.format_message(), exc.exit_code).exit_code)
    except typer.Abort:
        sys.exit(fail("aborted").exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def run() -> None:
    """The `tandem` program: ``main``, then, for a command that talks to the appliance,
    the end of the process without the interpreter's teardown (freeing every module's
    objects, a tenth of such a command's time: each `tandem` call is a new process).
    Output is flushed first; the exit status is the one ``main`` gave. Other commands (the
    daemons, the demo, the storage engine's own) end as usual, with their exit handlers."""
    name = command_name(sys.argv[1:])
    if name not in COMMANDS or COMMANDS[name][0] not in API_MODULES:
        main()
        return
    try:
        main()
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what was lost is lost either way
            code = code or 1
    os._exit(code)
