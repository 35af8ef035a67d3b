"""The drill's closing report: a JSON-able document of its steps, jobs and DR measures
(RPO achieved, failover time, failback downtime, bytes moved, data verified equal), and the
same for people (``print_report``, on stdout).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tandem.domain.units import human_bytes

if TYPE_CHECKING:
    from .steps import Context, StepRecord

stdout = Console()
HOST_ROOT_VAR = "DEMO_HOST_ROOT"
"""The variable telling a host agent where its "host's" file system is (both hosts share
this machine)."""

COMPARISONS = {
    "dr_test_copy": "dr: test copy = replica",
    "dr_test_copy_unchanged": "dr: test copy unchanged by replication",
    "dr_test_volume": "dr: test volume (NBD) = replica",
    "dr_failover_files": "dr: failed-over files = replica",
    "dr_failover_disk": "dr: failed-over volume = replica",
    "production_files": "production: files = DR copy",
    "production_disk": "production: disk = DR volume",
}
"""The data comparisons the drill makes, as the report names them."""
VM_COMPARISONS = {"dr_test_vm": "dr: new test VM read what production wrote"}
"""The one `tandem demo --vm` adds."""
LABELS = COMPARISONS | VM_COMPARISONS


def build_report(
    ctx: Context, records: list[StepRecord], seconds: float, workdir: str, kept: bool
) -> dict[str, Any]:
    failed = next((r for r in records if r.status == "failed"), None)
    jobs = [j for r in records for j in r.jobs]
    ok = failed is None and all(r.status == "succeeded" for r in records)
    measures = {k: v for k, v in ctx.measures.items() if k != "downtime_started"}
    return {
        "ok": ok,
        "failed_step": failed.name if failed else None,
        "error": f"{failed.title}: {failed.error}" if failed else None,
        "seconds": round(seconds, 3),
        "workdir": workdir,
        "kept": kept,
        "rpo_seconds": measures.get("rpo_seconds"),
        "rows_lost": measures.get("rows_lost"),
        "failover_seconds": measures.get("failover_seconds"),
        "failback_downtime_seconds": measures.get("failback_downtime_seconds"),
        "measures": measures,
        "data_equal": dict(ctx.data_equal),
        "data_verified_equal": all(ctx.data_equal.get(name) for name in COMPARISONS)
        and all(ctx.data_equal.values()),
        "bytes_moved": {r.name: r.bytes_sent for r in records if r.jobs},
        "transfers": dict(ctx.transfers),
        "steps": [asdict(r) for r in records],
        "checks": dict(ctx.checks),
        "images": dict(ctx.images),
        "bytes_total": sum(j.bytes_total for j in jobs),
        "bytes_sent": sum(j.bytes_sent for j in jobs),
        "sites": {
            role: {
                "appliance": {"name": s.appliance.name, "url": s.appliance.url},
                "agent": {"name": s.agent.name, "url": s.agent.url},
                "host_root": str(s.root),
            }
            for role, s in ctx.sites.items()
        },
    }


def _seconds(value: Any) -> str:
    return "—" if value is None else f"{float(value):.2f} s"


def print_report(report: dict[str, Any]) -> None:
    """The closing report on stdout: steps and their jobs, the DR measures, the verdict."""
    table = Table(
        title="tandem demo — two-site DR drill", box=box.SIMPLE_HEAD, title_justify="left"
    )
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("step / job (site)", overflow="fold")
    table.add_column("time", justify="right", no_wrap=True, min_width=8)
    table.add_column("sent", justify="right", no_wrap=True, min_width=10)
    marks = {"succeeded": "[green]✓[/]", "failed": "[red]✗[/]", "skipped": "[dim]-[/]"}
    for i, step in enumerate(report["steps"], 1):
        seconds = "" if step["status"] == "skipped" else f"{step['seconds']:.2f} s"
        sent = sum(j["bytes_sent"] for j in step["jobs"])
        table.add_row(
            str(i),
            f"{marks.get(step['status'], '?')} {escape(step['title'])}",
            seconds,
            human_bytes(sent) if step["jobs"] else "",
        )
        for job in step["jobs"]:
            table.add_row(
                "",
                f"  [dim]{job['site']}[/] {job['type']} {job['app']} {job['id']}",
                f"[dim]{job['seconds']:.2f} s[/]",
                f"[dim]{human_bytes(job['bytes_sent'])}[/]",
            )
    stdout.print(table)
    results = Table.grid(padding=(0, 1))
    results.add_column(justify="right", no_wrap=True)
    results.add_column(overflow="fold")
    for i, step in enumerate(report["steps"], 1):
        if step["status"] == "succeeded":
            results.add_row(f"{i}.", f"{escape(step['title'])}: {escape(step['result'])}")
        elif step["status"] == "failed":
            results.add_row(
                f"{i}.",
                f"{escape(step['title'])}: [red]FAILED: {escape(step['error'] or '')}[/]",
            )
    stdout.print(results)
    stdout.print()
    summary = Table.grid(padding=(0, 2))
    summary.add_column(no_wrap=True)
    summary.add_column(overflow="fold")
    m = report["measures"]
    if report["rpo_seconds"] is not None:
        lost = report["rows_lost"]
        summary.add_row(
            "RPO achieved",
            f"{_seconds(report['rpo_seconds'])} (age of the newest replica at the disaster"
            + (f"; about {lost} rows lost" if lost is not None else "")
            + ")",
        )
    if report["failover_seconds"] is not None:
        summary.add_row(
            "failover time",
            f"{_seconds(report['failover_seconds'])} (failover call → app up at the DR site)",
        )
    if report["failback_downtime_seconds"] is not None:
        reported = m.get("failback_downtime_reported_seconds")
        summary.add_row(
            "failback downtime",
            f"{_seconds(report['failback_downtime_seconds'])} (app stopped at dr → app started "
            "at production"
            + (f"; the restore job reports {_seconds(reported)}" if reported is not None else "")
            + ")",
        )
    labels = {
        "replication-full": "first replication",
        "replication-incremental": "incremental replication",
        "replication-during-test": "replication during the test",
        "syncback-catch-up": "catch-up syncback",
        "syncback-final": "final syncback",
        "replication-after-failback": "replication after failback",
    }
    for key, label in labels.items():
        sent = report["transfers"].get(key)
        if sent:
            summary.add_row(
                label,
                f"{human_bytes(sum(sent.values()))} "
                f"({', '.join(f'{a} {human_bytes(n)}' for a, n in sent.items())})",
            )
    if report["data_equal"]:
        summary.add_row(
            "data verified equal",
            "; ".join(
                f"{LABELS.get(name, name)} {'[green]✓[/]' if ok else '[red]✗[/]'}"
                for name, ok in report["data_equal"].items()
            ),
        )
    summary.add_row(
        "bytes moved",
        f"{human_bytes(report['bytes_sent'])} between machines in all "
        f"({human_bytes(report['bytes_total'])} processed)",
    )
    stdout.print(summary, highlight=False)
    if report["ok"]:
        stdout.print(
            f"[green]all {len(report['steps'])} steps succeeded in {report['seconds']:.1f} s; "
            "data verified equal at each site[/]",
            highlight=False,
        )
    else:
        stdout.print(f"[red]demo FAILED: {escape(report['error'] or '')}[/]", highlight=False)
    if report["kept"]:
        root = report["workdir"]
        stdout.print(f"files kept in {root}; to look around:", highlight=False)
        for site in report["sites"].values():
            appliance, agent = site["appliance"]["name"], site["agent"]["name"]
            stdout.print(
                f"  tandem appliance serve {root}/{appliance} &\n"
                f"  {HOST_ROOT_VAR}={site['host_root']} tandem agent serve {root}/{agent} &\n"
                f"  set -a; . {root}/{appliance}.env; set +a; tandem jobs",
                highlight=False,
                soft_wrap=True,
            )
