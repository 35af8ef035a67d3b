"""The agent's PostgreSQL helpers that need no running cluster: slot names, and the refusal
of a cluster whose major version this host has no binaries for."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tandem.agent import fusemount, mounts, pg
from tandem.errors import ClusterUnfit, PostgresCommandFailed, RecoveryOver
from tandem.storage.manifest import DIR, FILE, HARDLINK, TreeEntry, TreeManifest
from tandem.storage.pool import ChunkPool
from tandem.storage.tree import capture_tree
from tandem.transport import agent_api
from tests.agent.conftest import Agent


def test_slot_names_are_what_postgresql_accepts() -> None:
    assert pg.slot_name("db") == "tandem_db"
    assert pg.slot_name("Web-1.prod") == "tandem_web_1_prod"
    assert len(pg.slot_name("x" * 64)) <= 63


def test_a_cluster_of_a_major_version_the_host_lacks_is_refused_naming_the_package(
    tmp_path: Path,
) -> None:
    (tmp_path / "PG_VERSION").write_text("99\n")
    with pytest.raises(ClusterUnfit) as refused:
        pg.find_cluster(str(tmp_path))
    assert "PostgreSQL 99 cluster" in refused.value.message
    assert "postgresql-99" in refused.value.message


def test_a_folder_that_is_no_cluster_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ClusterUnfit, match="PG_VERSION"):
        pg.find_cluster(str(tmp_path))
    installed = sorted(p.parent.parent.name for p in pg.PG_ROOT.glob("*/bin/postgres"))
    assert installed, "PostgreSQL is missing: install the Debian package postgresql"
    (tmp_path / "PG_VERSION").write_text(installed[-1] + "\n")
    with pytest.raises(ClusterUnfit, match="not running"):
        pg.find_cluster(str(tmp_path))


def test_a_postmaster_pid_copied_from_another_cluster_names_no_server_here(
    tmp_path: Path,
) -> None:
    """A base backup read live carries its cluster's postmaster.pid: written elsewhere (a
    failback's first pass), its server is not this folder's, to query or to stop."""
    installed = sorted(p.parent.parent.name for p in pg.PG_ROOT.glob("*/bin/postgres"))
    (tmp_path / "PG_VERSION").write_text(installed[-1] + "\n")
    other = "/srv/the-dr-copy"  # names a live process (this one), of another data folder
    (tmp_path / "postmaster.pid").write_text(f"{os.getpid()}\n{other}\n0\n5432\n/tmp\n")
    with pytest.raises(ClusterUnfit, match="names no running server"):
        pg.find_cluster(str(tmp_path))
    assert pg.stop_copy(str(tmp_path)) is False  # never signalled


def test_a_failing_client_program_is_reported_with_its_last_line() -> None:
    c = pg.Cluster("/srv/pg", 5432, "/run/postgresql", "root", os.geteuid(), 0, "15")
    with pytest.raises(PostgresCommandFailed) as failed:
        pg._run(c, ["sh", "-c", "echo first >&2; echo 'FATAL: the cause' >&2; exit 3"], "a query")
    assert "a query failed: FATAL: the cause" in failed.value.message


SEG = "000000010000000000000003"


def restore_script(spool: Path, rounds: int) -> Path:
    spool.mkdir()
    script = spool / "restore.sh"
    script.write_text(pg.restore_script(rounds))
    (spool / "plan").write_text(f"{SEG}\n")
    return script


def test_the_restore_command_fails_at_once_for_wal_outside_the_plan(tmp_path: Path) -> None:
    """PostgreSQL asks for history files and the segment after the last: "no such WAL"."""
    script = restore_script(tmp_path / "tandem_wal", rounds=100_000)
    for name in ("00000002.history", "000000010000000000000004"):
        done = subprocess.run(["/bin/sh", str(script), name, str(tmp_path / "out")], timeout=30)
        assert done.returncode == 1
    assert not (tmp_path / "tandem_wal" / "want").exists()


def test_the_restore_command_names_the_segment_and_copies_it_once_staged(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "tandem_wal"
    script = restore_script(spool, rounds=100_000)
    proc = subprocess.Popen(["/bin/sh", str(script), SEG, str(tmp_path / "RECOVERYXLOG")])
    try:
        req = agent_api.WantedRequest(path=str(tmp_path), after=None, wait=10.0)
        deadline = time.monotonic() + 30
        while pg.spool_wanted(req)["wanted"] != SEG:  # what the appliance sees
            assert time.monotonic() < deadline, "the script never named the segment it waits for"
        assert proc.poll() is None  # waiting for the segment, not failing
        (spool / f".{SEG}.tmp").write_bytes(b"wal bytes")
        os.replace(spool / f".{SEG}.tmp", spool / SEG)  # staged as spool_wal does
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert (tmp_path / "RECOVERYXLOG").read_bytes() == b"wal bytes"
    assert pg.wal_waited(spool) > 0  # reported with the recovery: replay stood waiting


def test_the_wait_the_copy_reports_is_believed_only_as_whole_numbers(tmp_path: Path) -> None:
    """``waited`` is written by the copy's owner: junk counts for nothing."""
    (tmp_path / "waited").write_text("20\n-5\n1e9\nabc\n99999999999\n40\n")
    assert pg.wal_waited(tmp_path) == 60 * pg.RESTORE_POLL
    assert pg.wal_waited(tmp_path / "missing") == 0.0


def test_the_restore_command_aborts_the_recovery_when_the_segment_never_comes(
    tmp_path: Path,
) -> None:
    """Exit 126: PostgreSQL aborts rather than end the recovery short of its target."""
    script = restore_script(tmp_path / "tandem_wal", rounds=2)
    done = subprocess.run(["/bin/sh", str(script), SEG, str(tmp_path / "out")], timeout=30)
    assert done.returncode == 126
    assert not (tmp_path / "out").exists()


def test_only_a_segment_name_is_believed_from_the_copy(tmp_path: Path) -> None:
    """The copy's owner can write ``want``: anything but a segment name reads as none."""
    (tmp_path / "tandem_wal").mkdir()
    (tmp_path / "tandem_wal" / "want").write_text("../../etc/passwd\n")
    assert pg.spool_wanted(agent_api.WantedRequest(path=str(tmp_path)))["wanted"] is None


INSTALLED = sorted(p.parent.parent.name for p in pg.PG_ROOT.glob("*/bin/postgres"))


def looks_like_a_cluster(folder: Path) -> Path:
    """A folder the agent's PostgreSQL calls take for a cluster of a version this host has."""
    folder.mkdir()
    (folder / "PG_VERSION").write_text(f"{INSTALLED[-1]}\n")
    return folder


def test_a_copy_to_recover_gets_no_wal_slots_or_startup_files_of_the_base() -> None:
    """What a recovery replaces or never reads is not written when a base image is
    presented to be recovered (a loaded cluster's ``pg_wal`` can be half of its image);
    the folders stay, ``pg_wal/archive_status`` too, and every data file is kept."""

    def entry(path: str, kind: str = FILE, target: str = "") -> TreeEntry:
        return TreeEntry(path=path, type=kind, size=8192 if kind == FILE else 0, target=target)

    kept = [
        entry("PG_VERSION"),
        entry("base", DIR),
        entry("base/5", DIR),
        entry("base/5/16384"),
        entry("global", DIR),
        entry("global/pg_control"),
        entry("pg_wal", DIR),
        entry("pg_wal/archive_status", DIR),
        entry("pg_replslot", DIR),
        entry("pg_subtrans", DIR),
        entry("pg_xact", DIR),
        entry("pg_xact/0000"),
        entry("postgresql.auto.conf"),
        entry("pg_walnut", DIR),  # not a folder of the list, only a name that starts alike
        entry("pg_walnut/x"),
    ]
    dropped = [
        entry(f"pg_wal/{SEG}"),
        entry("pg_wal/archive_status/000000010000000000000001.done"),
        entry("pg_replslot/tandem_db", DIR),
        entry("pg_replslot/tandem_db/state"),
        entry("pg_subtrans/0000"),
        entry("pg_stat_tmp/global.stat"),
        entry("postmaster.pid"),
        entry("postmaster.opts"),
        entry("base/5/link", HARDLINK, target=f"pg_wal/{SEG}"),
    ]
    image = TreeManifest([*kept, *dropped], {"source": "/srv/db"})
    shown = pg.for_recovery(image)
    assert [e.path for e in shown.entries] == [e.path for e in kept]
    assert shown.meta == image.meta
    assert len(image.entries) == len(kept) + len(dropped)  # the image itself is unchanged


def test_a_base_image_is_captured_without_its_wal_slots_or_start_up_files(
    tmp_path: Path,
) -> None:
    """The WAL is streamed apart: a base image leaves ``pg_wal``'s segments out (up to
    ``max_wal_size`` of a loaded cluster), and what PostgreSQL remakes at start; the folders
    themselves and every data file are in it."""
    data = tmp_path / "pgdata"
    kept = ["PG_VERSION", "base/5/16384", "global/pg_control", "pg_xact/0000", "pg_walnut/x"]
    folders = ["base", "base/5", "global", "pg_wal", "pg_wal/archive_status", "pg_replslot"]
    folders += ["pg_stat_tmp", "pg_xact", "pg_walnut"]
    dropped = [f"pg_wal/{SEG}", "pg_wal/archive_status/000000010000000000000001.done"]
    dropped += ["pg_replslot/tandem_db/state", "pg_stat_tmp/global.stat", "postmaster.pid"]
    for name in folders:
        (data / name).mkdir(parents=True, exist_ok=True)
    for name in kept + dropped:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(os.urandom(100))
    pool = ChunkPool.create(tmp_path / "pool")
    _, image, _ = capture_tree(pool, data, leave_out=pg.not_recovered)
    assert sorted(e.path for e in image.entries) == sorted(kept + folders)


@pytest.mark.skipif(not INSTALLED, reason="needs PostgreSQL on this host")
def test_wal_and_recovery_go_only_into_a_copy_this_agent_presented(
    agent: Agent, tmp_path: Path
) -> None:
    """Guards the agent's ``presented`` check on ``pg/spool``, ``pg/spool/wanted`` and
    ``pg/recover``: an appliance (or whoever holds the agent token) may not drop WAL or
    recovery settings into any cluster of the host, only into a copy presented here."""
    copy = looks_like_a_cluster(tmp_path / "copy")
    other = looks_like_a_cluster(tmp_path / "other")  # e.g. the host's own database
    registry = mounts.Registry(agent.directory)
    registry.begin({"image": "img_aaaaaaaaaaaa", "paths": [str(copy)]})
    registry.finish("img_aaaaaaaaaaaa")
    run = "0123456789abcdef"
    refused = [
        agent.client.put(
            "/api/v1/pg/spool",
            params={"path": str(other), "name": SEG, "run": run},
            content=b"wal bytes",
            headers=agent.auth,
        ),
        agent.client.post(
            "/api/v1/pg/spool/wanted", json={"path": str(other), "run": run}, headers=agent.auth
        ),
        agent.client.post(
            "/api/v1/pg/recover",
            json={"path": str(other), "run": run, "backup_label": "START WAL LOCATION: 0/0\n"},
            headers=agent.auth,
        ),
    ]
    for answer in refused:
        assert answer.status_code == 422, answer.text
        assert f"{other} is not a copy presented on this host" in answer.json()["message"]
    assert sorted(p.name for p in other.iterdir()) == ["PG_VERSION"]  # nothing written
    taken = agent.client.put(
        "/api/v1/pg/spool",
        params={"path": str(copy), "name": SEG, "run": run},
        content=b"wal bytes",
        headers=agent.auth,
    )
    assert taken.status_code == 200, taken.text
    assert [p.name for p in copy.rglob(SEG)] == [SEG]


@pytest.mark.skipif(not INSTALLED, reason="needs PostgreSQL on this host")
def test_a_segment_arriving_after_the_recovery_ended_stays_out_of_the_copy(
    tmp_path: Path,
) -> None:
    """Segments are sent two at a time: one still on its way when the copy was promoted and
    its spool removed must not bring the spool back (it would travel home with the copy)."""
    copy = looks_like_a_cluster(tmp_path / "copy")
    run = "0123456789abcdef"
    pg.spool_wal(agent_api.SpoolRequest(path=str(copy), name=SEG, run=run), b"wal bytes")
    shutil.rmtree(copy / pg.SPOOL)  # promoted: what _settle does
    pg._settled.add((str(copy), run))  # what recover records once it has settled the copy
    with pytest.raises(RecoveryOver, match="is over"):
        pg.spool_wal(agent_api.SpoolRequest(path=str(copy), name=SEG, run=run), b"late")
    assert not (copy / pg.SPOOL).exists()
    pg.spool_wal(agent_api.SpoolRequest(path=str(copy), name=SEG, run="f" * 16), b"next run")


def test_a_read_session_refresh_reaches_only_the_fuse_copies_of_its_image(
    agent: Agent, tmp_path: Path
) -> None:
    """Guards ``layers/refresh``: a new session is given only to the FUSE copies of the
    image named, as this agent presented them; another image's copies keep theirs."""
    old = {"url": "https://old", "fingerprint": "f", "token": "t", "session": "aa"}
    layer = tmp_path / "layer"
    layer.mkdir()
    config = fusemount.LayerConfig(
        manifest="0" * 64, appliance=fusemount.SessionRef(**old), lower="/x", stats="/y"
    )
    (layer / "config.json").write_text(config.model_dump_json())
    registry = mounts.Registry(agent.directory)
    registry.begin({"image": "img_aaaaaaaaaaaa", "paths": [str(tmp_path / "copy")]})
    registry.finish("img_aaaaaaaaaaaa", layers=[{"dir": str(layer), "path": str(tmp_path)}])
    new = {"url": "https://new", "fingerprint": "f", "token": "t2", "session": "bb"}

    def refresh(image: str) -> int:
        answer = agent.client.post(
            "/api/v1/layers/refresh", json={"image": image, "appliance": new}, headers=agent.auth
        )
        assert answer.status_code == 200, answer.text
        return int(answer.json()["refreshed"])

    def session_of_layer() -> str:
        cfg = fusemount.LayerConfig.model_validate_json((layer / "config.json").read_text())
        return cfg.appliance.session

    assert refresh("img_bbbbbbbbbbbb") == 0
    assert session_of_layer() == "aa"
    assert refresh("img_aaaaaaaaaaaa") == 1
    assert session_of_layer() == "bb"
