"""kill -9 in the middle of a failback's steps, with real daemons: each step run again
completes, and what was written at the DR site arrives at production byte for byte.

- the DR appliance is killed during a syncback (after it captured the DR copy, while it
  sends it home);
- the production agent is killed during the restore of the syncback image (a file half
  written at production);
- the DR appliance is killed during the snapshot-style failback (after its checks passed
  and it began withdrawing the DR copy, before it recorded ``managed``).

The kills land where they should without sleeps in the product or the test: the parties
the step talks to next are paused (SIGSTOP) as soon as the step is seen to be there (an
image row, a log line, a half-written file), so the step waits on them; the daemon is
killed once its call to a paused party is under way (its request unread in the kernel's
socket table, ``calling``), and the paused ones are continued.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.conftest import (
    Cli,
    Daemon,
    Drill,
    api,
    calling,
    job_row,
    pause,
    protect_and_replicate,
    resume,
    wait_for,
)

MiB = 1024 * 1024
BIG = 40 * MiB  # big enough that a restore is seen half-way
SMALL_FILES = 200  # files written at the DR site besides the big one
CONFIRM = ("--confirm", "DATA LOSS", "--confirm", "OVERWRITE OTHER APPS")


# --- helpers ----------------------------------------------------------------------------


class _continued:
    """``with _continued(d):`` makes sure ``d`` is not left paused."""

    def __init__(self, d: Daemon) -> None:
        self.d = d

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        resume(self.d)


def poll(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """``wait_for`` at a pace that catches a step in the act."""
    return wait_for(predicate, timeout, what, interval=0.005)


def recovered(cli: Cli, job_id: str) -> dict[str, Any]:
    """The job as the restarted appliance left it: failed, not running for ever."""
    doc: dict[str, Any] = cli("job", "show", job_id)
    found: dict[str, Any] = doc.get("job", doc)
    assert found["status"] == "failed", found
    return found


def digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes()).hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def state(cli: Cli, app: str) -> str:
    return str(next(a for a in cli("apps") if a["name"] == app)["state"])


# --- the test ---------------------------------------------------------------------------


def test_each_step_killed_midway_completes_when_run_again(drill: Drill, tmp_path: Path) -> None:
    s = drill
    prod = tmp_path / "shop"
    (prod / "orders").mkdir(parents=True)
    (prod / "orders" / "1.json").write_text('{"order": 1}\n')
    protect_and_replicate(s, "shop", "filesystem", prod)
    dr_copy = tmp_path / "dr-shop"
    s.b(
        "failover",
        "shop",
        "--host",
        "host2",
        "--confirm",
        "FAILOVER",
        "--mount-point",
        str(dr_copy),
    )

    # the app writes at the DR site: a large file and many small ones
    (dr_copy / "big.bin").write_bytes(os.urandom(BIG))
    (dr_copy / "orders" / "1.json").write_text('{"order": 1, "amended": "at DR"}\n')
    many = dr_copy / "many"
    many.mkdir()
    for i in range(SMALL_FILES):
        (many / f"{i}.txt").write_text(f"row {i} written at the DR site\n")
    at_dr = tree_digests(dr_copy)

    # 1. the DR appliance dies while it sends the syncback home
    pause(s.prod)  # production answers nothing: the send waits there
    with _continued(s.prod):
        assert not calling(s.dr, s.prod)  # no call under way yet
        started = s.b("syncback", "shop", "--no-wait")["job"]
        poll(
            lambda: any(i["kind"] == "syncback" for i in s.b("images", "shop")),
            60,
            "the syncback captured at the DR site",
        )
        poll(lambda: calling(s.dr, s.prod), 60, "the syncback's call to production")
        assert job_row(s.dr, started["id"])["status"] == "running"
        s.dr.kill9()
    s.dr.start()
    assert "syncback" not in {i["kind"] for i in s.a("images", "shop")}  # nothing arrived
    recovered(s.b, started["id"])
    again = s.b("syncback", "shop")
    assert again["job"]["status"] == "succeeded", again["job"]
    image = again["image"]["id"]
    assert image in {i["id"] for i in s.a("images", "shop") if i["kind"] == "syncback"}

    # 2. the production agent dies while it restores that syncback
    restoring = s.a("restore", "shop", "--image", image, *CONFIRM, "--no-wait")["job"]
    big = prod / "big.bin"
    poll(lambda: big.exists() and 0 < big.stat().st_size < BIG, 60, "big.bin half-restored")
    pause(s.prod_agent)
    s.prod_agent.kill9()
    assert big.stat().st_size < BIG or digest(big) != at_dr["big.bin"]
    wait_for(lambda: job_row(s.prod, restoring["id"])["status"] == "failed", 60, "restore to fail")
    s.prod_agent.start()
    done = s.a("restore", "shop", "--image", image, *CONFIRM)
    assert done["job"]["status"] == "succeeded", done["job"]
    assert tree_digests(prod) == at_dr

    # 3. the DR appliance dies while the failback withdraws the DR copy
    # The job asks production whether it restored the newest syncback, then compares the DR
    # copy at its host ("comparing …"), withdraws it, and only then tells production the
    # epoch before it records `managed`. The DR host's agent is held first, so the job waits
    # in the comparison; production is held next, and the agent let go: the job then waits
    # in the call that follows the withdrawal.
    pause(s.dr_agent)
    with _continued(s.dr_agent):
        failing_back = s.b("failback", "shop", "--no-wait")["job"]
        poll(
            lambda: "comparing" in job_row(s.dr, failing_back["id"])["message"],
            60,
            "the failback comparing the DR copy",
        )
        pause(s.prod)
    with _continued(s.prod):

        def withdrawn() -> bool:
            with api(s.dr) as client:
                lines = client.get(f"/api/v1/jobs/{failing_back['id']}/log").json()
            return any("withdrawing the DR copy" in line["text"] for line in lines)

        poll(withdrawn, 60, "the failback withdrawing the DR copy")
        # the withdrawal done, the call to (paused) production that follows it under way
        poll(lambda: calling(s.dr, s.prod), 60, "the failback's call to production")
        assert job_row(s.dr, failing_back["id"])["status"] == "running", "the kill came too late"
        s.dr.kill9()
    s.dr.start()
    recovered(s.b, failing_back["id"])
    assert state(s.b, "shop") == "failed-over"  # the step did not finish...
    failover_image = next(i for i in s.b("images", "shop") if i["kind"] == "failover")
    assert failover_image["state"] == "deleting"  # ...but had begun to withdraw the copy
    done = s.b("failback", "shop")  # ...and runs again to the end
    assert done["job"]["status"] == "succeeded", done["job"]
    assert state(s.b, "shop") == "managed"
    assert not dr_copy.exists()
    assert {i["kind"] for i in s.b("images", "shop")} == {"replica"}
    assert tree_digests(prod) == at_dr  # every byte written at the DR site is home

    # and mirroring resumes from production
    (prod / "orders" / "2.json").write_text('{"order": 2}\n')
    snap = s.a("capture", "shop")["image"]
    wait_for(lambda: any(i["id"] == snap["id"] for i in s.b("images", "shop")), 60, "replica")
