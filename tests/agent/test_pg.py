"""The agent's PostgreSQL helpers that need no running cluster: slot names, and the refusal
of a cluster whose major version this host has no binaries for."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tandem.agent import pg
from tandem.errors import ClusterUnfit, PostgresCommandFailed


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


def test_a_failing_client_program_is_reported_with_its_last_line() -> None:
    c = pg.Cluster("/srv/pg", 5432, "/run/postgresql", "root", os.geteuid(), 0, "15")
    with pytest.raises(PostgresCommandFailed) as failed:
        pg._run(c, ["sh", "-c", "echo first >&2; echo 'FATAL: the cause' >&2; exit 3"], "a query")
    assert "a query failed: FATAL: the cause" in failed.value.message
