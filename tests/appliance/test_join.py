"""``appliance init --join``: another process of one appliance, on a PostgreSQL catalog."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem.appliance.daemon import JOINED_TYPES, Appliance, init, join
from tandem.catalog import queries as q
from tandem.errors import InvalidInput
from tests.appliance.live import free_port


def listen() -> str:
    return f"127.0.0.1:{free_port()}"


def test_a_sqlite_appliance_cannot_be_joined(tmp_path: Path) -> None:
    init(tmp_path / "one", "prod", listen(), None)
    with pytest.raises(InvalidInput, match="PostgreSQL catalog") as info:
        join(tmp_path / "two", tmp_path / "one", listen())
    assert "--catalog postgresql://" in str(info.value)  # the fix
    assert not (tmp_path / "two" / "config.json").exists()
    with pytest.raises(InvalidInput, match="not a appliance directory"):
        join(tmp_path / "three", tmp_path / "nowhere", listen())


def test_a_joined_process_shares_name_catalog_pool_and_tokens(
    catalog_url: str, tmp_path: Path
) -> None:
    if not catalog_url.startswith("postgresql"):
        pytest.skip("several processes need a PostgreSQL catalog")
    first = init(tmp_path / "one", "prod", listen(), catalog_url)
    with pytest.raises(InvalidInput, match="named 'prod', not 'other'"):
        join(tmp_path / "two", tmp_path / "one", listen(), name="other")
    second = join(tmp_path / "two", tmp_path / "one", listen(), workers=2)
    assert second["name"] == "prod" and second["fingerprint"] != first["fingerprint"]
    with pytest.raises(InvalidInput, match="Join the first appliance process"):
        join(tmp_path / "three", tmp_path / "two", listen())
    one, two = Appliance(tmp_path / "one"), Appliance(tmp_path / "two")
    try:
        assert two.site.pool.root == (tmp_path / "one" / "pool").resolve()
        assert two.site.name == "prod" and two.joined and not one.joined
        # Shared catalog: both admin tokens are known to both processes.
        with two.catalog.read() as session:
            assert q.find_token(session, token=first["token"]) is not None
            assert q.find_token(session, token=second["token"]) is not None
        # On PostgreSQL no runner may take the running jobs of another for orphans.
        assert not one.runner.exclusive and not two.runner.exclusive
        assert set(two.runner.handlers) <= JOINED_TYPES < set(one.runner.handlers)
        assert two.site.presenter is None and one.site.presenter is one.nbd
        assert two.runner.workers == 2
    finally:
        one.stop()
        two.stop()


def test_a_sqlite_appliance_keeps_its_exclusive_runner(tmp_path: Path) -> None:
    init(tmp_path / "one", "prod", listen(), None)
    appliance = Appliance(tmp_path / "one")
    try:
        assert appliance.runner.exclusive and not appliance.joined
    finally:
        appliance.stop()


def test_a_joined_directory_on_a_sqlite_catalog_is_not_served(tmp_path: Path) -> None:
    """Guards ``Appliance``'s own refusal: a joined process whose config names a SQLite
    catalog (edited by hand, or copied) would run a second writer on one SQLite file."""
    init(tmp_path / "one", "prod", listen(), None)
    init(tmp_path / "two", "prod", listen(), None)
    config = tmp_path / "two" / "config.json"
    raw = json.loads(config.read_text())
    raw["extra"] = {
        "catalog": f"sqlite:///{(tmp_path / 'one' / 'catalog.db').resolve()}",
        "pool": str((tmp_path / "one" / "pool").resolve()),
        "join": str((tmp_path / "one").resolve()),
    }
    config.write_text(json.dumps(raw))
    with pytest.raises(InvalidInput, match="catalog is SQLite") as info:
        Appliance(tmp_path / "two")
    assert "PostgreSQL catalog" in str(info.value)  # the fix
