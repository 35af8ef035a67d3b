"""Two real appliance processes of one appliance on one PostgreSQL catalog and one pool
(``tandem appliance init DIR2 --join DIR1``), with a real agent: jobs claimed once each and
split between them, a killed process's job recovered by the other through its stale
heartbeat, one scheduler at a time, and a collection in one beside a capture in the other.

Which process runs a job is decided the way the runners decide it (the first free runner
claims it); a test that needs a job in a given process pauses the other (SIGSTOP) until the
job is seen running there, and a test that needs a capture to stay in flight pauses the
agent it waits on. Everything is polled for with a deadline, never slept for.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from tandem.catalog.db import normalize_url
from tandem.errors import TandemError
from tests.e2e.conftest import Daemon, api, pause, register_host, resume, wait_for

PG_URL = os.environ.get("TANDEM_TEST_PG_URL")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_URL, reason="needs TANDEM_TEST_PG_URL (a PostgreSQL server)"),
]

HEARTBEAT = 0.5
STALE_AFTER = 4.0
WORKERS = 2


@dataclass
class Pair:
    first: Daemon
    second: Daemon
    agent: Daemon
    root: Path

    def runner(self, d: Daemon) -> str:
        runner: str = info(d)["runner"]
        return runner


def info(d: Daemon) -> dict[str, Any]:
    with api(d) as client:
        answer: dict[str, Any] = client.get("/api/v1/info").json()
    return answer


def call(d: Daemon, method: str, path: str, **kw: Any) -> Any:
    with api(d) as client:
        response = client.request(method, f"/api/v1{path}", **kw)
    assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text}"
    return response.json()


def job(d: Daemon, job_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = call(d, "GET", f"/jobs/{job_id}")
    return answer


def wait_ended(d: Daemon, job_id: str, timeout: float = 120) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        row = job(d, job_id)
        return row if row["status"] in ("succeeded", "failed", "canceled") else None

    return wait_for(ended, timeout, f"job {job_id} to end", interval=0.1)


def run_in(
    target: Daemon, other: Daemon, runner: str, submit: Callable[[Daemon], dict[str, Any]]
) -> dict[str, Any]:
    """Submit a job through ``target``'s API while ``other`` is paused, so that ``target``
    claims it; ``other`` goes on once the job runs there."""
    pause(other)
    try:
        row = submit(target)
        wait_for(
            lambda: job(target, row["id"])["status"] != "queued", 60, "the claim", interval=0.05
        )
    finally:
        resume(other)
    claimed = job(target, row["id"])
    assert claimed["runner"] == runner, claimed
    return claimed


def capture(d: Daemon, app: str) -> dict[str, Any]:
    answer: dict[str, Any] = call(d, "POST", f"/apps/{app}/capture")["job"]
    return answer


def add_app(
    pair: Pair, name: str, files: int = 4, size: int = 64 * 1024, template: str = "manual"
) -> Path:
    data = pair.root / "data" / name
    data.mkdir(parents=True)
    for i in range(files):
        (data / f"f{i}.bin").write_bytes(os.urandom(size))
    call(
        pair.first,
        "POST",
        "/apps",
        json={"name": name, "host": "host1", "kind": "filesystem", "path": str(data)},
    )
    call(pair.first, "POST", f"/apps/{name}/protect", json={"template": template})
    return data


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    assert PG_URL is not None
    root = tmp_path_factory.mktemp("multi")
    base = make_url(normalize_url(PG_URL))
    schema = "test_multi_" + secrets.token_hex(4)
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = base.update_query_dict({"options": f"-csearch_path={schema}"})
    catalog = url.render_as_string(hide_password=False)
    daemons: list[Daemon] = []
    try:
        first = Daemon.create(
            "appliance", root / "a1", "prod", "--catalog", catalog, "--workers", str(WORKERS)
        )
        # Short heartbeats, so a vanished process's job is recovered within seconds; the
        # joined process takes them from the first one's config.
        config = json.loads((first.directory / "config.json").read_text())
        config["extra"].update(heartbeat=HEARTBEAT, stale_after=STALE_AFTER)
        (first.directory / "config.json").write_text(json.dumps(config))
        second = Daemon.create(
            "appliance", root / "a2", "prod", "--join", str(first.directory), "--workers", "2"
        )
        agent = Daemon.create("agent", root / "agent", "host1")
        daemons = [first, second, agent]
        for d in daemons:
            d.start()
        register_host(first.cli(), agent)
        first.cli()("template", "add", "manual", "--keep", "10")
        yield Pair(first, second, agent, root)
    finally:
        for d in reversed(daemons):
            d.stop()
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


def test_join_shares_the_appliance_and_refuses_a_sqlite_catalog(pair: Pair, tmp_path: Path) -> None:
    one, two = info(pair.first), info(pair.second)
    assert one["name"] == two["name"] == "prod"
    assert one["runner"] != two["runner"]
    assert one["fingerprint"] != two["fingerprint"]  # each process has its own certificate
    # One catalog: what one process's API wrote, the other's shows.
    assert [h["name"] for h in call(pair.second, "GET", "/hosts")] == ["host1"]
    # A SQLite catalog has one process.
    alone = Daemon.create("appliance", tmp_path / "alone", "solo")
    with pytest.raises(TandemError, match="PostgreSQL catalog"):
        Daemon.create("appliance", tmp_path / "more", "solo", "--join", str(alone.directory))
    assert not (tmp_path / "more" / "config.json").exists()


def test_captures_run_once_each_split_between_both_processes(pair: Pair) -> None:
    apps = [f"split{i}" for i in range(2 * WORKERS)]
    for name in apps:
        add_app(pair, name)
    runners = {pair.runner(pair.first), pair.runner(pair.second)}
    # With the agent paused every capture stays running once claimed, so each process
    # can hold only WORKERS of them: the runners split the jobs between them.
    pause(pair.agent)
    try:
        jobs = [capture(pair.first if i % 2 else pair.second, a) for i, a in enumerate(apps)]

        def all_running() -> list[dict[str, Any]] | None:
            rows = [job(pair.first, j["id"]) for j in jobs]
            return rows if all(r["status"] == "running" for r in rows) else None

        running = wait_for(all_running, 60, "every capture to be claimed", interval=0.1)
    finally:
        resume(pair.agent)
    by_runner = {r: sum(1 for row in running if row["runner"] == r) for r in runners}
    assert by_runner == {r: WORKERS for r in runners}, running
    done = [wait_ended(pair.second, j["id"]) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * len(apps), done
    assert all(d["attempts"] == 1 for d in done)  # claimed once, run once
    for name in apps:
        images = call(pair.first, "GET", f"/apps/{name}/images")
        assert len(images) == 1


def test_one_scheduler_at_a_time_and_another_takes_over(pair: Pair) -> None:
    def scheduler() -> list[Daemon] | None:
        leaders = [d for d in (pair.first, pair.second) if info(d)["scheduling"]]
        return leaders or None

    leaders = wait_for(scheduler, 60, "a process to run the schedule", interval=0.1)
    assert len(leaders) == 1
    leader = leaders[0]
    follower = pair.second if leader is pair.first else pair.first
    assert not info(follower)["scheduling"]
    cli = pair.first.cli()
    cli("template", "add", "every2s", "--every", "2s", "--keep", "3")
    add_app(pair, "sched", template="every2s")

    def scheduled(d: Daemon) -> list[dict[str, Any]]:
        rows = call(d, "GET", "/jobs", params={"app": "sched", "limit": 200})
        return [r for r in rows if r["actor"] == "scheduler" and r["status"] == "succeeded"]

    wait_for(lambda: len(scheduled(follower)) >= 2, 60, "scheduled captures", interval=0.2)
    # The schedule's process stops: the other takes the schedule over, and captures go on.
    leader.stop()
    try:
        wait_for(lambda: info(follower)["scheduling"], 60, "the other to take over", 0.1)
        seen = len(scheduled(follower))
        wait_for(lambda: len(scheduled(follower)) >= seen + 2, 60, "captures", interval=0.2)
    finally:
        leader.start()
        call(follower, "POST", "/apps/sched/unprotect")  # no more captures for the others
    assert not info(leader)["scheduling"]  # back, and the other keeps the schedule
    assert info(follower)["scheduling"]


def test_gc_in_one_process_while_the_other_captures_loses_nothing(pair: Pair) -> None:
    first_runner, second_runner = pair.runner(pair.first), pair.runner(pair.second)
    # Garbage: an image whose data no other image holds, deleted.
    churn = add_app(pair, "churn", files=6)
    old = wait_ended(pair.first, capture(pair.first, "churn")["id"])
    for path in churn.iterdir():
        path.write_bytes(os.urandom(64 * 1024))
    assert wait_ended(pair.first, capture(pair.first, "churn")["id"])["status"] == "succeeded"
    deleting = call(pair.first, "DELETE", f"/images/{old['image']}")["job"]
    assert wait_ended(pair.first, deleting["id"])["status"] == "succeeded"
    big = add_app(pair, "big", files=24, size=1024 * 1024)
    # Everything stored so far is an hour old, as in a pool in service: only marks keep it
    # (fresh files are spared by the cut-off, whatever their image).
    pool = pair.first.directory / "pool"
    old_time = time.time() - 3600
    for path in [*pool.glob("chunks/*/*"), *pool.glob("packs/*"), *pool.glob("manifests/*")]:
        os.utime(path, (old_time, old_time))
    # The capture runs in the second process and stays in flight (its agent paused, its
    # pool writer open) while a collection runs, start to end, in the first.
    pause(pair.agent)
    try:
        capturing = run_in(pair.second, pair.first, second_runner, lambda d: capture(d, "big"))
        first_gc = run_in(
            pair.first, pair.second, first_runner, lambda d: call(d, "POST", "/gc")["job"]
        )
        first_gc = wait_ended(pair.first, first_gc["id"])
        assert job(pair.first, capturing["id"])["status"] == "running"
    finally:
        resume(pair.agent)
    assert first_gc["status"] == "succeeded", first_gc
    assert first_gc["result"]["chunks_removed"] >= 6  # it swept the deleted image's data
    # More collections in the first while the capture moves its chunks in the second.
    more: list[dict[str, Any]] = []
    while job(pair.first, capturing["id"])["status"] == "running" and len(more) < 3:
        row = run_in(pair.first, pair.second, first_runner, lambda d: call(d, "POST", "/gc")["job"])
        more.append(wait_ended(pair.first, row["id"]))
    assert all(g["status"] == "succeeded" for g in more), more
    done = wait_ended(pair.second, capturing["id"])
    assert done["status"] == "succeeded", done
    for name in ("big", "churn"):
        for image in call(pair.first, "GET", f"/apps/{name}/images"):
            report = call(pair.second, "GET", f"/images/{image['id']}/verify")
            assert report["ok"] and not report["missing"], report
    # The capture holds the data that was there.
    restored = call(pair.first, "GET", f"/images/{done['image']}")
    assert restored["size"] == sum(p.stat().st_size for p in big.iterdir())


def test_a_killed_process_job_is_recovered_by_the_other_after_its_heartbeat_timeout(
    pair: Pair,
) -> None:
    add_app(pair, "victim")
    first_runner, second_runner = pair.runner(pair.first), pair.runner(pair.second)
    pause(pair.agent)
    try:
        running = run_in(pair.second, pair.first, second_runner, lambda d: capture(d, "victim"))
        pair.second.stop(signal.SIGKILL)
        failed = wait_ended(pair.first, running["id"], timeout=60)
    finally:
        resume(pair.agent)
    assert failed["status"] == "failed"
    assert failed["message"].startswith("interrupted")
    assert failed["runner"] == second_runner
    assert failed["finished"] is not None
    log = call(pair.first, "GET", f"/jobs/{running['id']}/log")
    lines = [entry["text"] for entry in log if "stopped; noted by runner" in entry["text"]]
    assert len(lines) == 1, log  # recovered once
    assert f"its runner {second_runner} stopped" in lines[0]
    assert f"noted by runner {first_runner}" in lines[0]
    # The killed process comes back and works; nothing it ran stays running.
    pair.second.start()
    again = wait_ended(pair.second, capture(pair.second, "victim")["id"])
    assert again["status"] == "succeeded", again
