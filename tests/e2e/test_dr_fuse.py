"""Instant file-tree presentation through the CLI with real daemons: a test failover of a
tree app is a virtual copy through FUSE on the DR host, whatever the tree's size; reads
fetch only what they touch, writes land in the host's copy-on-write layer, the replica never
changes, and deleting the test image takes everything away. The full copy stays available
as ``--action copy``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Drill, protect_and_replicate, wait_for

MiB = 1024 * 1024
GiB = 1024 * MiB

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"),
    reason="needs root, /dev/fuse and fusermount3 (Debian's fuse3)",
)


def make_tree(root: Path, *, sparse_gib: int) -> dict[str, bytes]:
    """10 MB of random files, plus (``sparse_gib`` > 0) 16 big files adding up to that
    many GiB, each one random MiB in every 256 MiB and holes elsewhere. Returns the small
    files' contents."""
    (root / "docs").mkdir(parents=True)
    small = {}
    for i in range(10):
        data = os.urandom(MiB + i)
        (root / "docs" / f"f{i}.bin").write_bytes(data)
        small[f"docs/f{i}.bin"] = data
    (root / "hello.txt").write_text("hello\n")
    small["hello.txt"] = b"hello\n"
    if sparse_gib:
        (root / "big").mkdir()
        each = sparse_gib * GiB // 16
        for i in range(16):
            with open(root / "big" / f"b{i}.img", "wb") as fh:
                for off in range(0, each, 256 * MiB):
                    fh.seek(off)
                    fh.write(os.urandom(MiB))
                fh.truncate(each)
    return small


def cmdlines() -> list[bytes]:
    """The command line of every process (one that ends meanwhile is left out)."""
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            found.append(path.read_bytes())
    return found


def layer_of(d: Drill, image: str) -> Path:
    return d.dr_agent.directory / "layers" / image


def fetched(d: Drill, image: str) -> int:
    stats = json.loads((layer_of(d, image) / "stats.json").read_text())
    return int(stats["fetched"])


def mounted(point: Path) -> bool:
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == str(point) for line in fh)


def present(d: Drill, app: str, target: Path) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    result = d.b("test-failover", app, "--host", "host2", "--mount-point", str(target))
    return result, time.monotonic() - t0


def test_tree_test_failover_is_a_virtual_copy_at_any_size(drill: Drill, tmp_path: Path) -> None:
    d = drill
    small_src, large_src = tmp_path / "small", tmp_path / "large"
    small_files = make_tree(small_src, sparse_gib=0)
    large_files = make_tree(large_src, sparse_gib=32)
    small_snap = protect_and_replicate(d, "notes", "filesystem", small_src)
    large_snap = protect_and_replicate(d, "archive", "filesystem", large_src)
    assert large_snap["size"] >= 32 * GiB

    timings = {}
    for app, src, files, snap in (
        ("notes", small_src, small_files, small_snap),
        ("archive", large_src, large_files, large_snap),
    ):
        target = tmp_path / f"dr-{app}"
        result, seconds = present(d, app, target)
        timings[app] = seconds
        image = result["image"]["id"]
        assert result["job"]["status"] == "succeeded"
        assert result["job"]["result"]["presentation"] == "fuse"
        # No full copy: presenting moved the manifest, not the files (the job's bytes_sent,
        # and nothing fetched by the FUSE server yet).
        assert result["job"]["bytes_sent"] < 2 * MiB, result["job"]
        assert mounted(target) and fetched(d, image) == 0
        assert sorted(os.listdir(target)) == sorted(os.listdir(src))

        # Reads fetch about what they read.
        for rel, data in files.items():
            assert (target / rel).read_bytes() == data
        read = sum(map(len, files.values()))
        assert read <= fetched(d, image) <= read + 4 * MiB
        if app == "archive":
            with open(target / "big" / "b7.img", "rb") as fh:
                fh.seek(3 * 256 * MiB)
                assert len(fh.read(MiB)) == MiB
            assert fetched(d, image) <= read + 8 * MiB  # not the 32 GiB
            assert os.path.getsize(target / "big" / "b7.img") == 2 * GiB

        # Writes land in the layer on the DR host; the replica never changes.
        (target / "docs" / "f1.bin").write_bytes(b"changed at the DR site")
        (target / "new.txt").write_text("new")
        os.unlink(target / "hello.txt")
        upper = layer_of(d, image) / "upper"
        assert (upper / "docs" / "f1.bin").read_bytes() == b"changed at the DR site"
        assert (upper / "new.txt").read_text() == "new"
        assert os.stat(upper / "hello.txt", follow_symlinks=False).st_rdev == 0  # whiteout
        assert not (upper / "docs" / "f2.bin").exists()
        assert d.b("image", "verify", snap["id"])["ok"]
        replica = next(i for i in d.b("images", app) if i["id"] == snap["id"])
        assert replica["manifest"] == snap["manifest"]
        assert (src / "hello.txt").read_text() == "hello\n"

        # Deleting the test image removes everything it made on the host.
        d.b("unmount", image)
        d.b("image", "delete", image)
        assert not mounted(target) and not target.exists()
        assert not layer_of(d, image).exists()
        assert not any(  # its FUSE server is gone (other tests may run their own)
            b"tandem.agent.fusemount" in argv and image.encode() in argv for argv in cmdlines()
        )
    # Reported, not asserted (machine speed): both are the same few steps.
    print(
        f"test failover of 10 MB: {timings['notes']:.2f} s; of 32 GiB: {timings['archive']:.2f} s"
    )


def test_the_copy_action_still_writes_a_full_plain_copy(drill: Drill, tmp_path: Path) -> None:
    d = drill
    src = tmp_path / "src"
    files = make_tree(src, sparse_gib=0)
    protect_and_replicate(d, "plain", "filesystem", src)
    target = tmp_path / "dr-plain"
    result = d.b(
        "test-failover",
        "plain",
        "--host",
        "host2",
        "--mount-point",
        str(target),
        "--action",
        "copy",
    )
    assert result["job"]["result"]["presentation"] == "copy"
    assert not mounted(target)
    assert {rel: (target / rel).read_bytes() for rel in files} == files
    assert result["job"]["bytes_sent"] >= sum(map(len, files.values()))
    image = result["image"]["id"]
    d.b("unmount", image)
    d.b("image", "delete", image)
    assert not target.exists()


def test_the_copy_survives_restarts_of_the_agent_and_of_the_appliance(
    drill: Drill, tmp_path: Path
) -> None:
    d = drill
    src = tmp_path / "src"
    files = make_tree(src, sparse_gib=0)
    protect_and_replicate(d, "ledger", "filesystem", src)
    target = tmp_path / "dr-ledger"
    result, _ = present(d, "ledger", target)
    image = result["image"]["id"]
    assert (target / "docs" / "f0.bin").read_bytes() == files["docs/f0.bin"]
    (target / "written.txt").write_text("kept")

    # The agent restarts: the applications' files stay where they are.
    d.dr_agent.stop()
    assert mounted(target) and (target / "docs" / "f1.bin").read_bytes() == files["docs/f1.bin"]
    d.dr_agent.start()

    # The appliance restarts: its sessions are gone; the copy gets a new one and reads on.
    d.dr.stop()
    d.dr.start()

    def reads() -> bool:
        try:
            return (target / "docs" / "f5.bin").read_bytes() == files["docs/f5.bin"]
        except OSError:
            return False  # EIO until the new session reached the host

    wait_for(reads, 60, "reads through the new read session")
    assert (target / "written.txt").read_text() == "kept"

    # The restarted agent still takes it all down.
    d.b("unmount", image)
    d.b("image", "delete", image)
    assert not mounted(target) and not layer_of(d, image).exists()
