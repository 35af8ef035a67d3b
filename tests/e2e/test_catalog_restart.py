"""The PostgreSQL catalog restarted under a running appliance (SPEC: every operation is a job;
issue "Scale", bad input: "the PostgreSQL catalog restarted mid-job (the job fails with a
reason or resumes)").

The catalog is a PostgreSQL cluster of the test's own (restarting the shared test server
would break every other test), the appliance and agent are real daemons. A capture is held
in flight by pausing the agent once data flows; the cluster is restarted with a fast
shutdown, which ends every session of the appliance; then the agent goes on. What an
operator relies on: the job ends (succeeded, or failed with a reason) rather than staying
"running" forever, the appliance keeps answering, the next capture succeeds, and every image
the catalog lists verifies.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Daemon, api, job_row, pause, register_host, resume, wait_for
from tests.e2e.test_live_apps import Cluster, as_postgres, shared_dir

__all__ = ["shared_dir"]  # the fixture


TERMINAL = ("succeeded", "failed", "canceled")


@dataclass
class Rig:
    cluster: Cluster
    appliance: Daemon
    agent: Daemon
    data: Path


def _restart(cluster: Cluster) -> None:
    """A fast restart: every session of the appliance is ended by the server."""
    cluster.stop()
    cluster.start()


@pytest.fixture
def rig(shared_dir: Path) -> Iterator[Rig]:
    sockets = shared_dir / "sockets"
    sockets.mkdir()
    shutil.chown(sockets, "postgres", "postgres")
    data = shared_dir / "catalog"
    data.mkdir()
    shutil.chown(data, "postgres", "postgres")
    data.chmod(0o700)
    cluster = Cluster(data, sockets)
    as_postgres(
        str(cluster.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"
    )
    cluster.start()
    daemons: list[Daemon] = []
    try:
        cluster.sql("CREATE DATABASE tandem")
        url = f"postgresql://postgres@/tandem?host={sockets}&port={cluster.port}"
        appliance = Daemon.create("appliance", shared_dir / "appliance", "prod", "--catalog", url)
        agent = Daemon.create("agent", shared_dir / "agent", "host1")
        daemons = [appliance, agent]
        for d in daemons:
            d.start()
        register_host(appliance.cli(), agent)
        source = shared_dir / "vol.img"
        with open(source, "wb") as f:  # big enough that a capture is seen mid-way
            for _ in range(64):
                f.write(os.urandom(1 << 20))
        cli = appliance.cli()
        cli("app", "add", "vol", "--host", "host1", "--kind", "volume", "--path", str(source))
        cli("template", "add", "manual", "--keep", "10")
        cli("app", "protect", "vol", "--template", "manual")
        yield Rig(cluster, appliance, agent, source)
    finally:
        for d in reversed(daemons):
            d.stop()
        cluster.stop()


def _start_capture(rig: Rig) -> str:
    with api(rig.appliance) as client:
        answer = client.post("/api/v1/apps/vol/capture")
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["job"]["id"]
    return job_id


def _ended(rig: Rig, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        try:
            row = job_row(rig.appliance, job_id)
        except Exception:  # the appliance may answer 5xx while its catalog is away
            return None
        return row if row.get("status") in TERMINAL else None

    row: dict[str, Any] = wait_for(done, 180, f"job {job_id} to end", interval=0.2)
    return row


def test_a_capture_in_flight_when_the_catalog_restarts_ends_and_the_next_one_succeeds(
    rig: Rig,
) -> None:
    cli = rig.appliance.cli()
    job_id = _start_capture(rig)
    wait_for(
        lambda: int(job_row(rig.appliance, job_id).get("bytes_done") or 0) > 0,
        120,
        "the capture to move data",
        interval=0.05,
    )
    pause(rig.agent)
    try:
        _restart(rig.cluster)
    finally:
        resume(rig.agent)
    row = _ended(rig, job_id)
    print("OUTCOME", row["status"], row.get("message"), row.get("attempts"))
    if row["status"] != "succeeded":
        assert row["status"] == "failed" and row["message"], row
        assert "Traceback" not in row["message"]
    # The appliance answers on a fresh catalog connection, and its runner still runs jobs.
    assert cli("apps")[0]["name"] == "vol"
    after = cli("capture", "vol")
    assert after["job"]["status"] == "succeeded", after
    images = cli("images", "vol")
    assert images, "the capture after the restart made no image"
    for image in images:
        assert cli("image", "verify", image["id"])["ok"] is True, image


def test_a_capture_that_ends_while_the_catalog_is_down_is_recorded_once_it_is_back(
    rig: Rig,
) -> None:
    cli = rig.appliance.cli()
    # The agent is held before the capture starts, so the job cannot end (however fast
    # the capture is) before the catalog is down: it is running, waiting on the agent.
    pause(rig.agent)
    try:
        job_id = _start_capture(rig)
        wait_for(
            lambda: job_row(rig.appliance, job_id).get("status") == "running",
            120,
            "the capture to start",
            interval=0.05,
        )
    except BaseException:
        resume(rig.agent)
        raise
    rig.cluster.stop()
    try:
        resume(rig.agent)
        # The job's end is known to the appliance only: it says in its log that it waits
        # for the catalog to record it.
        wait_for(
            lambda: f"job {job_id}: The catalog database" in rig.appliance.log_path.read_text(),
            180,
            "the appliance to wait for its catalog",
            interval=0.2,
        )
    finally:
        rig.cluster.start()
    row = _ended(rig, job_id)
    assert row["status"] == "failed", row
    assert "catalog database" in row["message"] and "Traceback" not in row["message"], row
    # Nothing half-made is visible, and the next capture takes the whole volume.
    assert cli("images", "vol") == []
    after = cli("capture", "vol")
    assert after["job"]["status"] == "succeeded", after
    (image,) = cli("images", "vol")
    assert cli("image", "verify", image["id"])["ok"] is True


def test_a_job_queued_while_the_catalog_is_down_is_refused_clearly_then_runs_once_it_is_back(
    rig: Rig,
) -> None:
    cli = rig.appliance.cli()
    rig.cluster.stop()
    try:
        refused = cli.run("capture", "vol", check=False)
        assert refused.code != 0
        assert "Traceback" not in refused.stderr
        assert "catalog" in refused.stderr.lower(), refused.stderr
    finally:
        rig.cluster.start()
    done = cli("capture", "vol")
    assert done["job"]["status"] == "succeeded", done
