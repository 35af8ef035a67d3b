"""Live applications, end to end: captures of an app that keeps writing are taken, and never
torn. Real daemons, driven by the CLI; the app's data on loop-mounted btrfs and ext4."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent.loopfs import PairWriter, loop_mounts, torn
from tests.e2e.conftest import Site

PAIRS = 32
CONFIRM = ["--confirm", "DATA LOSS", "--confirm", "OVERWRITE OTHER APPS"]


@pytest.fixture
def mkfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    with loop_mounts(tmp_path) as make:
        yield make


def pair_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.name.startswith("pair")}


def test_every_capture_of_a_busy_app_on_btrfs_is_taken_and_consistent(
    site: Site, mkfs: Callable[[str], Path]
) -> None:
    cli = site.cli
    fs = mkfs("btrfs")
    data = fs / "db"
    subprocess.run(["btrfs", "subvolume", "create", str(data)], check=True, capture_output=True)
    app = cli(
        "app", "add", "busy", "--host", site.host, "--kind", "filesystem", "--path", str(data)
    )
    assert app["consistency"] == "auto"
    cli("template", "add", "busy-manual")
    cli("app", "protect", "busy", "--template", "busy-manual")
    images = []
    with PairWriter(data, PAIRS, size=64 * 1024) as writer:
        start = writer.rounds
        for _ in range(3):
            taken = cli("capture", "busy")
            assert taken["job"]["status"] == "succeeded", taken["job"]
            images.append(taken["image"]["id"])
        assert writer.rounds > start  # it wrote through every capture
    listed = {i["id"]: i for i in cli("images", "busy")}
    assert {listed[i]["consistency"] for i in images} == {"snapshot-btrfs"}
    for image in images:  # each restored copy is a state the app had at one instant
        done = cli("restore", "busy", "--image", image, *CONFIRM)
        assert done["job"]["status"] == "succeeded", done["job"]
        assert torn(pair_files(data), PAIRS) == []
    assert [n for n in (p.name for p in fs.iterdir()) if n.startswith(".tandem")] == []


def test_a_busy_app_on_ext4_is_never_captured_torn(site: Site, mkfs: Callable[[str], Path]) -> None:
    """ext4 has no point-in-time source: the live files are read and checked after reading,
    so a capture under a writer that never pauses fails (saying why), or holds a state the
    app had; it never succeeds torn."""
    cli = site.cli
    fs = mkfs("ext4")
    data = fs / "db"
    data.mkdir()
    cli("app", "add", "live", "--host", site.host, "--kind", "filesystem", "--path", str(data))
    cli("template", "add", "live-manual")
    cli("app", "protect", "live", "--template", "live-manual")
    outcomes = []
    with PairWriter(data, PAIRS, size=64 * 1024):
        for _ in range(2):
            run = cli.run("capture", "live", check=False)
            outcomes.append(run)
    for run in outcomes:
        if run.code == 0:
            assert run.doc["image"]["consistency"] == "crash-unsafe"
            done = cli("restore", "live", "--image", run.doc["image"]["id"], *CONFIRM)
            assert done["job"]["status"] == "succeeded", done["job"]
            assert torn(pair_files(data), PAIRS) == []
        else:
            assert "changed" in run.error and "Traceback" not in run.stderr

    cli("app", "set", "live", "--consistency", "snapshot")
    refused = cli.run("capture", "live", check=False)
    assert refused.code != 0 and "Traceback" not in refused.stderr
    assert "No point in time" in refused.error and "ext4" in refused.error


def test_a_consistency_that_does_not_exist_is_refused_and_nothing_changes(
    site: Site, tmp_path: Path
) -> None:
    cli = site.cli
    bad = cli.run(
        "app",
        "add",
        "odd",
        "--host",
        site.host,
        "--kind",
        "filesystem",
        "--path",
        str(tmp_path),
        "--consistency",
        "sometimes",
        check=False,
    )
    assert bad.code == 2 and "Traceback" not in bad.stderr and "--consistency" in bad.stderr
    assert "odd" not in {a["name"] for a in cli("apps")}
