"""Failover of a file tree presents a FUSE virtual copy (nothing copied up front), the app
writes at the DR site, and a catch-up syncback cuts the copy's layer at one instant while a
writer goes on: end to end through the CLI with real daemons, real FUSE, real overlayfs and
real btrfs / XFS loop mounts.

The writer (``PairWriter``) rewrites pairs of files round after round; every instant it
leaves has counters that never rise and differ by at most one in writing order, so an image
holding anything else was torn (``torn``)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tandem.drill.lab import Daemon
from tests.agent.loopfs import PairWriter, loop_mounts, torn
from tests.e2e.conftest import Drill, protect_and_replicate, register_host
from tests.e2e.test_live_apps import pair_files

MiB = 1024 * 1024
PAIRS = 16
CONFIRM = ("--confirm", "DATA LOSS", "--confirm", "OVERWRITE OTHER APPS")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"),
    reason="needs root, /dev/fuse and fusermount3 (Debian's fuse3)",
)


def mount_type(point: Path) -> str | None:
    """The file system type mounted at ``point`` (the topmost), or None."""
    found = None
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            if left.split()[4] == str(point):
                found = right.split()[0]
    return found


def others(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` but the writer's pairs, by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and not p.name.startswith("pair")
    }


def make_app(root: Path) -> None:
    (root / "docs" / "old").mkdir(parents=True)
    (root / "keep").mkdir()
    for i in range(4):
        (root / "docs" / f"d{i}.bin").write_bytes(os.urandom(200_000 + i))
        (root / "docs" / "old" / f"o{i}.txt").write_text(f"old {i}\n")
        (root / "keep" / f"k{i}.txt").write_text(f"keep {i}\n")
    PairWriter(root, PAIRS, size=64 * 1024)  # the pairs, as production left them


def change_at_dr(copy: Path) -> None:
    """What the app did at the DR site: a deletion, renames (a file, a folder), a replaced
    folder, a changed and a new file."""
    os.unlink(copy / "docs" / "d0.bin")
    os.rename(copy / "docs" / "d1.bin", copy / "docs" / "renamed.bin")
    os.rename(copy / "keep", copy / "kept")
    shutil.rmtree(copy / "docs" / "old")
    (copy / "docs" / "old").mkdir()
    (copy / "docs" / "old" / "fresh.txt").write_text("made at DR\n")
    with open(copy / "docs" / "d2.bin", "r+b") as fh:
        fh.write(b"changed at DR")
    (copy / "new.txt").write_text("new at DR\n")


@pytest.mark.parametrize("fstype", ["btrfs", "xfs"])
def test_failover_of_a_tree_is_a_fuse_copy_synced_back_while_it_serves(
    drill: Drill, tmp_path: Path, fstype: str
) -> None:
    d = drill
    app = f"files-{fstype}"
    prod = tmp_path / "prod"
    prod.mkdir()
    make_app(prod)
    protect_and_replicate(d, app, "filesystem", prod)
    with loop_mounts(tmp_path) as mkfs:
        fs = mkfs(fstype)
        copy = fs / "app"
        t0 = time.monotonic()
        over = d.b(
            "failover", app, "--host", "host2", "--confirm", "FAILOVER",
            "--mount-point", str(copy),
        )  # fmt: skip
        seconds = time.monotonic() - t0
        assert over["job"]["status"] == "succeeded", over["job"]
        assert over["job"]["result"]["presentation"] == "fuse", over["job"]["result"]
        assert mount_type(copy) == "overlay"
        assert over["job"]["bytes_sent"] < 2 * MiB  # the manifest, not the files
        image = over["image"]["id"]
        layer = fs / f".tandem-layer-{image}"  # on the file system chosen for the app
        assert layer.is_dir()
        assert others(copy) == others(prod) and pair_files(copy) == pair_files(prod)

        change_at_dr(copy)
        expected = others(copy)
        with PairWriter(copy, PAIRS, size=64 * 1024) as writer:
            catch_up = d.b("syncback", app, "--label", "catch-up")
            assert writer.rounds > 1
        assert catch_up["job"]["status"] == "succeeded", catch_up["job"]
        # The layer cut by reflink clones checked with writes held: one instant.
        assert catch_up["job"]["result"]["consistency"] == "reflink", catch_up["job"]["result"]
        assert catch_up["image"]["consistency"] == "reflink"
        assert catch_up["job"]["result"]["writes_held_seconds"] is not None
        done = d.a("restore", app, "--image", catch_up["image"]["id"], *CONFIRM)
        assert done["job"]["status"] == "succeeded", done["job"]
        assert torn(pair_files(prod), PAIRS) == []
        assert others(prod) == expected
        assert not (prod / "docs" / "old" / "o0.txt").exists()  # the replaced folder's

        final = d.b("syncback", app, "--label", "final")  # the app stopped
        assert final["job"]["status"] == "succeeded", final["job"]
        done = d.a("restore", app, "--image", final["image"]["id"], *CONFIRM)
        assert done["job"]["status"] == "succeeded", done["job"]
        assert pair_files(prod) == pair_files(copy) and others(prod) == others(copy)
        back = d.b("failback", app)
        assert back["job"]["status"] == "succeeded", back["job"]
        assert mount_type(copy) is None and not copy.exists()
        assert not layer.exists()
        assert not (d.dr_agent.directory / "layers" / image).exists()
        assert [p.name for p in fs.iterdir() if p.name != "lost+found"] == []
    print(f"failover of a tree on {fstype}: {seconds:.2f} s to usable files")


def test_failover_with_the_copy_action_still_places_a_full_copy(
    drill: Drill, tmp_path: Path
) -> None:
    d = drill
    prod = tmp_path / "prod"
    prod.mkdir()
    make_app(prod)
    protect_and_replicate(d, "plainfiles", "filesystem", prod)
    copy = tmp_path / "dr"
    over = d.b(
        "failover", "plainfiles", "--host", "host2", "--confirm", "FAILOVER",
        "--mount-point", str(copy), "--action", "copy",
    )  # fmt: skip
    assert over["job"]["status"] == "succeeded", over["job"]
    assert over["job"]["result"]["presentation"] == "copy"
    assert mount_type(copy) is None and others(copy) == others(prod)
    final = d.b("syncback", "plainfiles")
    assert final["job"]["status"] == "succeeded", final["job"]
    done = d.a("restore", "plainfiles", "--image", final["image"]["id"], *CONFIRM)
    assert done["job"]["status"] == "succeeded", done["job"]
    assert d.b("failback", "plainfiles")["job"]["status"] == "succeeded"
    assert not copy.exists()


def path_without(tool: str, farm: Path) -> str:
    """A PATH with every command of this host but ``tool``: a host where its package is not
    installed (links to the real commands in ``farm``)."""
    farm.mkdir()
    for folder in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name != tool and not (farm / name).exists():
                os.symlink(os.path.join(folder, name), farm / name)
    return str(farm)


def test_failover_to_a_host_without_fuse_places_a_full_copy_and_says_why(
    drill: Drill, tmp_path: Path
) -> None:
    d = drill
    agent = Daemon.create("agent", tmp_path / "agent3", "host3")
    agent.extra_env["PATH"] = path_without("fusermount3", tmp_path / "bin")
    agent.start()
    try:
        register_host(d.b, agent)
        prod = tmp_path / "prod"
        prod.mkdir()
        make_app(prod)
        protect_and_replicate(d, "nofuse", "filesystem", prod)
        copy = tmp_path / "dr"
        over = d.b(
            "failover", "nofuse", "--host", "host3", "--confirm", "FAILOVER",
            "--mount-point", str(copy),
        )  # fmt: skip
        assert over["job"]["status"] == "succeeded", over["job"]
        assert over["job"]["result"]["presentation"] == "copy"
        assert mount_type(copy) is None and others(copy) == others(prod)
        log = " | ".join(line["text"] for line in d.b("job", "log", over["job"]["id"]))
        assert "a full copy, not a virtual one: fusermount3 is missing" in log, log
        final = d.b("syncback", "nofuse")
        assert final["job"]["status"] == "succeeded", final["job"]
        done = d.a("restore", "nofuse", "--image", final["image"]["id"], *CONFIRM)
        assert done["job"]["status"] == "succeeded", done["job"]
        assert d.b("failback", "nofuse")["job"]["status"] == "succeeded"
        assert not copy.exists()
    finally:
        agent.stop()
