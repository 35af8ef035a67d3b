"""Entry point of the `tandem` command.

Usage errors (unknown command or option, missing argument) are one line on stderr with exit
status 2, like every other error (CLI.md); ``tandem`` alone, or a group alone, prints help.
"""

from __future__ import annotations

import sys

import typer

# typer 0.29 vendors click; its usage errors live in this (private) module.
from typer._click.exceptions import NoArgsIsHelpError, UsageError

from tandem.cli import daemons, demo, dr, jobs, ops, peers, setup, storage
from tandem.cli.output import fail

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="tandem: two-site disaster recovery.",
)
app.add_typer(storage.app, name="storage")
app.add_typer(daemons.appliance_app, name="appliance")
app.add_typer(daemons.agent_app, name="agent")
app.command("demo")(demo.demo)

# Set-up (CLI.md): groups for one thing, plural commands for the lists.
app.add_typer(setup.token_app, name="token")
app.add_typer(setup.host_app, name="host")
app.add_typer(setup.template_app, name="template")
app.add_typer(setup.app_app, name="app")
app.command("hosts")(setup.hosts)
app.command("templates")(setup.templates)
app.command("apps")(setup.apps)

# Lifecycle and the Monitor.
app.command("capture")(ops.capture)
app.command("restore")(ops.restore)
app.command("images")(ops.images)
app.add_typer(ops.image_app, name="image")
app.command("jobs")(jobs.jobs)
app.add_typer(jobs.job_app, name="job")
app.command("audit")(ops.audit)

# The other site.
app.add_typer(peers.peer_app, name="peer")
app.command("peers")(peers.peer_list)
app.command("replicate")(peers.replicate)
app.command("test-failover")(dr.test_failover)
app.command("failover")(dr.failover)
app.command("mount")(dr.mount)
app.command("unmount")(dr.unmount)
app.command("syncback")(dr.syncback)
app.command("failback")(dr.failback)
app.command("clone")(dr.clone)
app.command("commit-failback")(dr.commit_failback)
app.command("undo-failback")(dr.undo_failback)


def main() -> None:
    command = typer.main.get_command(app)
    args = sys.argv[1:]
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
