"""Replica-style failback (SPEC §5) through the CLI with real daemons: to the original app,
with a protective snapshot, then commit — or undo back to the DR copy."""

from __future__ import annotations

import os
from pathlib import Path

from tandem.drill.lab import install_hook_script
from tests.e2e.conftest import Drill, wait_for
from tests.e2e.test_dr_presentation import tree_digests


def setup_app(d: Drill, name: str, tmp_path: Path) -> tuple[Path, Path]:
    """An app with stop/start hooks at both sites: scripts in each host agent's scripts/
    folder that append ``HOOK HOST SITE OPERATION IMAGE PATH`` (from the TANDEM_*
    environment) to the returned events file, registered at production and, once the app
    is mirrored there, at the DR site (the DR site's hooks are its own)."""
    data = tmp_path / name
    (data / "db").mkdir(parents=True)
    (data / "db" / "rows.txt").write_text("row 1\n")
    events = tmp_path / f"{name}.events"
    for agent in (d.prod_agent, d.dr_agent):
        for hook in ("stop", "start"):
            line = (
                f"{hook} {agent.name} $TANDEM_SITE $TANDEM_OPERATION ${{TANDEM_IMAGE:--}} "
                "$TANDEM_APP_PATH"
            )
            install_hook_script(
                agent.directory, f"{name}-{hook}", f'#!/bin/sh\necho "{line}" >> {events}\n'
            )
    hooks = ("--stop", f"{name}-stop", "--start", f"{name}-start")
    d.a("app", "add", name, "--host", "host1", "--kind", "filesystem", "--path", str(data), *hooks)
    d.a("app", "protect", name, "--template", "mirrored")
    snap = d.a("capture", name)["image"]
    wait_for(lambda: any(i["id"] == snap["id"] for i in d.b("images", name)), 60, "replica")
    # The DR site's record holds no hook of production's: its own operators set its own.
    mirror = d.b("app", "show", name)
    assert mirror["start"] is None and mirror["stop"] is None and mirror["origin"] == "prod"
    d.b("app", "set", name, *hooks)
    return data, events


def state(cli: object, name: str) -> str:
    return str(next(a for a in cli("apps") if a["name"] == name)["state"])  # type: ignore[operator]


def test_failback_to_the_original_then_commit(drill: Drill, tmp_path: Path) -> None:
    d = drill
    data, events = setup_app(d, "erp", tmp_path)
    dr_copy = tmp_path / "dr-erp"
    failover = d.b(
        "failover", "erp", "--host", "host2", "--confirm", "FAILOVER", "--mount-point", str(dr_copy)
    )
    dr_image = failover["image"]["id"]
    # the DR host's start hook, told to act on the failed-over copy, not on production's path
    assert events.read_text().splitlines() == [f"start host2 dr failover {dr_image} {dr_copy}"]
    (dr_copy / "db" / "rows.txt").write_text("row 1\nrow 2 written at the DR site\n")
    (dr_copy / "db" / "new.txt").write_text("new at DR\n")

    done = d.b("failback", "erp", "--target", "original", "--power-on")
    assert done["job"]["status"] == "succeeded", done["job"]
    assert done["job"]["result"]["downtime_seconds"] > 0
    assert tree_digests(data) == tree_digests(dr_copy)  # every DR write is at production
    # start at DR (failover), stop production, stop the DR copy, start production
    assert events.read_text().splitlines() == [
        f"start host2 dr failover {dr_image} {dr_copy}",
        f"stop host1 production failback - {data}",
        f"stop host2 dr failback-replica {dr_image} {dr_copy}",
        f"start host1 production failback - {data}",
    ]
    assert state(d.b, "erp") == "failback-pending"
    kinds = [i["kind"] for i in d.b("images", "erp")]
    assert "protective" in kinds

    # a write at the DR site after the protective snapshot would be lost by a commit
    (dr_copy / "db" / "late.txt").write_text("written at DR after the failback\n")
    refused = d.b.run("commit-failback", "erp", check=False)
    assert refused.code == 1 and "--force" in refused.error, refused.error
    assert state(d.b, "erp") == "failback-pending"
    committed = d.b("commit-failback", "erp", "--force")
    assert committed["job"]["status"] == "succeeded", committed["job"]
    assert state(d.b, "erp") == "managed"
    assert {i["kind"] for i in d.b("images", "erp")} == {"replica"}
    # protection resumes: production's next capture is mirrored again
    (data / "db" / "rows.txt").write_text("row 1\nrow 2 written at the DR site\nrow 3\n")
    snap = d.a("capture", "erp")["image"]
    wait_for(lambda: any(i["id"] == snap["id"] for i in d.b("images", "erp")), 60, "replica")


def test_undo_returns_to_the_dr_copy_as_it_was(drill: Drill, tmp_path: Path) -> None:
    d = drill
    setup_app(d, "crm", tmp_path)
    dr_copy = tmp_path / "dr-crm"
    d.b(
        "failover", "crm", "--host", "host2", "--confirm", "FAILOVER", "--mount-point", str(dr_copy)
    )
    (dr_copy / "db" / "rows.txt").write_text("written at DR before the failback\n")
    d.b("failback", "crm", "--target", "original")
    before_undo = tree_digests(dr_copy)
    (dr_copy / "db" / "stray.txt").write_text("must not survive the undo\n")

    refused = d.b.run("commit-failback", "nope", check=False)
    assert refused.code == 1
    undone = d.b("undo-failback", "crm")
    assert undone["job"]["status"] == "succeeded", undone["job"]
    assert state(d.b, "crm") == "failed-over"
    assert tree_digests(dr_copy) == before_undo  # exactly the protective snapshot
    again = d.b.run("undo-failback", "crm", check=False)
    assert again.code == 1 and "failed-over" in again.error  # nothing pending any more

    # The DR copy (a FUSE copy) fails back again and is committed: it is taken down.
    assert d.b("failback", "crm", "--target", "original")["job"]["status"] == "succeeded"
    assert d.b("commit-failback", "crm")["job"]["status"] == "succeeded"
    assert not os.path.ismount(dr_copy) and not dr_copy.exists()


def test_a_target_production_did_not_register_is_refused_before_anything_changes(
    drill: Drill, tmp_path: Path
) -> None:
    """Reproduction: `failback --target new --host H --path DIR` deleted what DIR held, and a
    wrong --host was found only after production's app was stopped and a syncback sent."""
    d = drill
    data, events = setup_app(d, "hr", tmp_path)
    dr_copy = tmp_path / "dr-hr"
    d.b("failover", "hr", "--host", "host2", "--confirm", "FAILOVER", "--mount-point", str(dr_copy))
    (dr_copy / "db" / "rows.txt").write_text("row 1\nwritten at DR\n")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("not the app's\n")
    before = events.read_text()

    for host in ("host1", "nohost"):
        refused = d.b.run(
            "failback",
            "hr",
            "--target",
            "new",
            "--host",
            host,
            "--path",
            str(precious),
            check=False,
        )
        assert refused.code == 1, refused.error
        assert "tandem app add NAME --host" in refused.error and "prod" in refused.error
        assert "Traceback" not in refused.error
    assert (precious / "keep.txt").read_text() == "not the app's\n"
    assert events.read_text() == before  # production's app was not stopped
    assert [i for i in d.a("images", "hr") if i["kind"] == "syncback"] == []
    assert state(d.b, "hr") == "failed-over"

    # production's operators register the new location: then it is the target
    target = tmp_path / "hr-new"
    d.a("app", "add", "hr-new", "--host", "host1", "--kind", "filesystem", "--path", str(target))
    done = d.b("failback", "hr", "--target", "new", "--host", "host1", "--path", str(target))
    assert done["job"]["status"] == "succeeded", done["job"]
    assert tree_digests(target) == tree_digests(dr_copy)
    assert (data / "db" / "rows.txt").read_text() == "row 1\n"
    at_prod = next(a for a in d.a("apps") if a["name"] == "hr")
    assert at_prod["path"] == str(target) and at_prod["peer_active"]
    assert d.b("commit-failback", "hr")["job"]["status"] == "succeeded"
    assert not os.path.ismount(dr_copy) and not dr_copy.exists()
