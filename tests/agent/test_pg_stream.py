"""The agent's WAL receiver against a real cluster: the point a listing vouches for.

Replication is asynchronous: a commit is acknowledged before the receiver has its WAL. The
window an operator recovers into ends at the listing's ``seen``, so ``seen`` may pass a
commit only once the files listed hold it."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tandem.agent import pg
from tandem.domain.wal import SEGMENT, parse_lsn, parse_name
from tandem.transport import agent_api
from tests.agent.conftest import Agent
from tests.e2e.conftest import wait_for
from tests.e2e.pgsite import make_cluster, server_now, shared_dir
from tests.e2e.test_live_apps import Cluster

__all__ = ["shared_dir"]  # the fixture, used by name


def seen(receivers: pg.Receivers, app: str) -> datetime | None:
    text = receivers.listing(app)["seen"]
    return datetime.fromisoformat(text) if text else None


def holds(receivers: pg.Receivers, app: str, cluster: Path, lsn: int) -> bool:
    """Whether the newest file listed holds the cluster's own WAL up to ``lsn``."""
    files = [f["name"] for f in receivers.listing(app)["files"]]
    newest = max((f for f in files if not f.endswith(".history")), default=None)
    assert newest is not None, files
    name = newest.removesuffix(".partial")
    _, start = parse_name(name)
    assert start <= lsn <= start + SEGMENT, (newest, lsn)
    received = (receivers.spool(app) / newest).read_bytes()
    written = (cluster / "pg_wal" / name).read_bytes()
    return bool(received[: lsn - start] == written[: lsn - start])


@contextlib.contextmanager
def streaming(shared_dir: Path, tmp_path: Path, app: str) -> Iterator[tuple[Cluster, pg.Receivers]]:
    """A cluster streamed by the agent's receiver for ``app`` until a first point is
    covered; the receiver dropped and the cluster stopped at the end."""
    prod = make_cluster(shared_dir, "pgdata")
    receivers = pg.Receivers(tmp_path)
    stream = agent_api.StreamRequest(app=app, path=str(prod.data))
    try:
        receivers.ensure(stream)
        wait_for(lambda: seen(receivers, app) is not None, 60, "a first point covered")
        yield prod, receivers
    finally:
        receivers.drop(stream)
        prod.stop()


def test_a_listing_vouches_only_for_commits_its_files_hold(
    shared_dir: Path, tmp_path: Path
) -> None:
    with streaming(shared_dir, tmp_path, "cov") as (prod, receivers):
        group = int((tmp_path / "pg" / "cov" / "receivewal.pid").read_text())
        os.killpg(group, signal.SIGSTOP)  # the receiver lags: it has nothing new
        try:
            prod.sql("CREATE TABLE held (x int); INSERT INTO held VALUES (1)")
            committed = server_now(prod)
            lsn = parse_lsn(prod.sql("SELECT pg_current_wal_flush_lsn()"))
            for _ in range(3):  # listings made while the commit is not received
                point = seen(receivers, "cov")
                assert point is not None and point < committed
        finally:
            os.killpg(group, signal.SIGCONT)

        def past() -> bool:
            point = seen(receivers, "cov")
            return point is not None and point > committed

        wait_for(past, 60, "the point covered past the commit")
        assert holds(receivers, "cov", prod.data, lsn)  # what the window claims is received


def test_a_partial_segment_is_sent_whole_up_to_what_the_receiver_flushed(
    shared_dir: Path, tmp_path: Path
) -> None:
    """The growing ``.partial`` is zero-padded, but WAL itself may end in zeros: a record
    whose last bytes are zero must be sent whole once the window claims it (a commit's
    record cut there was lost at DR though the window ended after it)."""
    with streaming(shared_dir, tmp_path, "zeros") as (prod, receivers):
        # A record ending in 200 zero bytes, the last one written (no commit follows it).
        end = parse_lsn(
            prod.sql(
                "SELECT pg_logical_emit_message(false, 'tandem', decode(repeat('00', 200), 'hex'))"
            )
        )
        flushed = "SELECT pg_current_wal_flush_lsn()"  # the WAL writer flushes it soon
        wait_for(lambda: parse_lsn(prod.sql(flushed)) >= end, 60, "the record flushed")
        written_at = server_now(prod)

        def past() -> bool:
            point = seen(receivers, "zeros")
            return point is not None and point > written_at

        wait_for(past, 60, "the point covered past the record")
        files = [f["name"] for f in receivers.listing("zeros")["files"]]
        partial = max(f for f in files if f.endswith(".partial"))
        _, start = parse_name(partial.removesuffix(".partial"))
        assert start < end <= start + SEGMENT
        sent = receivers.read(agent_api.WalRead(app="zeros", name=partial, offset=0))
        wal = (prod.data / "pg_wal" / partial.removesuffix(".partial")).read_bytes()
        assert len(sent) >= end - start
        assert sent[: end - start] == wal[: end - start]


def test_a_wal_listing_from_the_wire_is_checked() -> None:
    """The appliance believes an agent's listing only as ``WalListing`` allows: a file name
    that is no WAL file, a point in time without its zone or an unknown field is refused."""
    good = {"files": [{"name": "000000010000000000000001.partial", "size": 8192}],
            "seen": "2026-12-03T10:00:00+00:00", "running": True}  # fmt: skip
    assert agent_api.WalListing.model_validate(good).seen is not None
    for bad in (
        {**good, "files": [{"name": "../../etc/passwd", "size": 1}]},
        {**good, "seen": "2026-12-03T10:00:00"},
        {**good, "extra": 1},
        {**good, "files": [{"name": "000000010000000000000001", "size": -1}]},
    ):
        with pytest.raises(ValueError):
            agent_api.WalListing.model_validate(bad)


@pytest.mark.parametrize(
    "listing",
    [
        {"files": [{"name": "../../etc/passwd", "size": 1}], "seen": None, "running": True},
        {"files": [], "seen": "2026-12-03T10:00:00", "running": True},
        {"files": [], "seen": None, "running": True, "extra": 1},
    ],
    ids=["not-a-wal-name", "naive-time", "unknown-field"],
)
def test_the_appliance_refuses_a_wal_listing_the_agent_should_never_send(
    agent: Agent, monkeypatch: pytest.MonkeyPatch, listing: dict[str, object]
) -> None:
    """An agent that answers a listing outside ``WalListing`` (compromised, or a bug) is
    refused by the appliance's client over the wire, naming the host: nothing of it is
    stored or believed."""
    from tandem.errors import RemoteError
    from tandem.transport.agent import AgentClient
    from tandem.transport.tls import fingerprint_of_pem

    monkeypatch.setattr(pg.Receivers, "listing", lambda self, app: listing)
    pem = (agent.directory / "cert.pem").read_text()
    url = str(agent.client.base_url).rstrip("/")
    with (
        AgentClient("h1", url, agent.token, fingerprint_of_pem(pem)) as client,
        pytest.raises(RemoteError, match=r"host h1.*WAL listing is invalid"),
    ):
        client.pg_wal("shop")
