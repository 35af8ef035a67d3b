"""Two live sites in-process: a production and a DR appliance, paired and mirroring, each
with its host agent, all served over HTTPS by uvicorn in threads (``tests.appliance.live``).

- ``prod`` (appliance ``prod``) has host ``host1``; ``dr`` (appliance ``dr``) has host
  ``host2`` and its NBD server running (failed-over volumes are exported over NBD).
- ``prod`` is paired with ``dr`` the way ``tandem peer add`` pairs them and has a mirroring
  template ``mirrored`` (no schedule: captures happen only when a test asks).
- Job runners run; schedulers do not (nothing happens that the test did not ask for).

Tests call operations on ``site.prod.site`` / ``site.dr.site`` directly, as routes do, and
wait for the jobs with ``TwoSites.run``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tandem.agent import app as agent_app
from tandem.agent import fusemount
from tandem.appliance.daemon import Appliance, init
from tandem.catalog import queries as q
from tandem.catalog.models import Job
from tandem.domain.jobs import JobStatus
from tandem.operations import hosts, peers, templates
from tandem.transport.server import load_daemon_dir
from tests.appliance.live import LiveServer, free_port

TEMPLATE = "mirrored"
JOB_TIMEOUT = 60.0


@dataclass
class TwoSites:
    prod: Appliance
    dr: Appliance
    root: Path

    def run(self, appliance: Appliance, job: Job, timeout: float = JOB_TIMEOUT) -> Job:
        """Wait for ``job`` of ``appliance`` to end; return its final row."""
        return appliance.runner.wait(job.id, timeout=timeout)

    def settle(self, appliance: Appliance, app: str, timeout: float = JOB_TIMEOUT) -> None:
        """Wait until no job of ``app`` is queued or running on ``appliance``."""
        with appliance.catalog.read() as session:
            open_jobs = [
                j.id
                for j in q.list_jobs(session, app=app, limit=50)
                if j.status in (JobStatus.QUEUED, JobStatus.RUNNING)
            ]
        for job_id in open_jobs:
            appliance.runner.wait(job_id, timeout=timeout)


def _agent(stack: contextlib.ExitStack, root: Path, name: str) -> dict[str, str]:
    directory = root / name
    info = agent_app.init(directory, name, f"127.0.0.1:{free_port()}")
    cfg = load_daemon_dir(directory, "agent")
    # Tree copies presented through FUSE outlive the agent: taken down once it stopped.
    stack.callback(fusemount.release_all, directory)
    stack.enter_context(LiveServer(agent_app.create_app(cfg, directory), directory, cfg.port))
    return info


def _appliance(
    stack: contextlib.ExitStack, root: Path, name: str
) -> tuple[Appliance, dict[str, str]]:
    directory = root / name
    info = init(directory, name, f"127.0.0.1:{free_port()}", None)
    appliance = Appliance(directory, workers=2)
    stack.callback(appliance.stop)
    stack.enter_context(LiveServer(appliance.app, directory, appliance.config.port))
    return appliance, info


@contextlib.contextmanager
def two_sites(root: Path) -> Iterator[TwoSites]:
    """Build, pair and run the two sites under ``root``; everything stops at the end."""
    with contextlib.ExitStack() as stack:
        prod, _ = _appliance(stack, root, "prod")
        dr, dr_info = _appliance(stack, root, "dr")
        for appliance, host in ((prod, "host1"), (dr, "host2")):
            info = _agent(stack, root, host)
            hosts.add_host(
                appliance.site,
                name=host,
                url=info["url"],
                token=info["token"],
                fingerprint=info["fingerprint"],
            )
        peers.pair(
            prod.site,
            url=dr_info["url"],
            token=dr_info["token"],
            fingerprint=dr_info["fingerprint"],
        )
        templates.add_template(prod.site, name=TEMPLATE, every=None, keep=None, mirror=True)
        dr.nbd.start()
        stack.callback(dr.nbd.stop)
        for appliance in (prod, dr):
            appliance.runner.start()
            stack.callback(appliance.runner.stop)
        yield TwoSites(prod, dr, root)
