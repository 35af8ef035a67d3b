"""`tandem demo`: the whole two-site DR drill (``tandem.drill``) on real daemons on
loopback; exits non-zero, naming the step, if anything fails. Progress goes to stderr, the
closing report to stdout (``--json``: one document)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tandem.errors import TandemError

from .common import json_mode
from .output import emit_json, fail, handle_errors, stderr


@handle_errors
def demo(
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the demo directory afterwards and print it.")
    ] = False,
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir", help="Work in this (new or empty) directory.", show_default=False
        ),
    ] = None,
    size_mib: Annotated[
        int, typer.Option("--size-mib", min=8, help="Size of the sample disk image in MiB.")
    ] = 64,
    write_seconds: Annotated[
        float,
        typer.Option("--write-seconds", min=0.2, help="How long the app writes between steps."),
    ] = 1.5,
    vm: Annotated[
        bool,
        typer.Option(
            "--vm",
            help="Also protect a real guest (libvirt, QEMU): capture, mirror, test failover to "
            "a new VM that boots at dr. Needs libvirtd running and root.",
        ),
    ] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Run the whole two-site DR drill on real daemons on loopback; exit non-zero if a step
    fails."""
    # The drill (and through it the daemons' clients) only when the demo runs: every
    # `tandem` run builds this command to list it in help (tests/cli/test_startup.py).
    from tandem.drill import steps, vmsteps
    from tandem.drill.lab import Lab
    from tandem.drill.report import print_report

    if vm and (missing := vmsteps.libvirt_missing()) is not None:
        raise fail(f"tandem demo --vm needs libvirt: {missing}", 2)
    try:
        lab = Lab(workdir, keep=keep, prefix="tandem-demo-")
    except TandemError as exc:
        raise fail(exc.message, 2) from None
    stderr.print(
        "[bold]tandem demo[/]: two sites — appliances prod and dr, hosts host1 and host2, and a "
        "sample app that keeps writing, through the whole DR lifecycle"
        + (", and a real guest under libvirt (--vm)" if vm else ""),
        highlight=False,
    )
    stderr.print(
        f"work directory {lab.root}" + (" (kept)" if keep else " (removed at the end)"),
        highlight=False,
        markup=False,
    )
    drill = vmsteps.vm_drill() if vm else None
    report, interrupted = steps.run_drill(lab, steps.Options(size_mib, write_seconds), drill)
    if json_mode(json_):
        emit_json(report)
    else:
        print_report(report)
    if interrupted:
        raise fail("interrupted", 130)
    if not report["ok"]:
        raise fail(f"demo failed at {report['error']}")
