"""A failover copy of a file tree (FUSE + a copy-on-write layer beside the mount point) cut
at one instant while a writer goes on (``fusemount.point_in_time``), by a real agent over a
real appliance's read session, on real btrfs, XFS and ext4 loop mounts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.agent import fusemount
from tandem.domain.consistency import ConsistencyMode
from tandem.drill.lab import wait_for
from tandem.errors import SourceChanged
from tandem.storage import tree
from tandem.storage.manifest import TreeManifest, load_manifest
from tests.agent.loopfs import PairWriter, loop_mounts, torn
from tests.agent.test_fusemount import make_tree
from tests.agent.test_mounts import IMAGE, Rig, files_of, rig
from tests.appliance.conftest import booted
from tests.catalog.conftest import catalog_url

__all__ = ["booted", "catalog_url", "rig"]

PAIRS = 8

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"),
    reason="needs root, /dev/fuse and fusermount3 (Debian's fuse3)",
)


def present_beside(rig: Rig, mid: bytes, target: Path) -> dict[str, object]:
    done = rig.materialize(
        rig.body(mid, mount_point=str(target), presentation="fuse", layer="beside")
    )
    assert done["event"] == "done", done
    record: dict[str, object] = rig.mounts()[IMAGE]["layers"][0]
    return record


def capture_cut(rig: Rig, record: dict[str, object], mid: bytes) -> tuple[TreeManifest, str]:
    """Capture the copy from its point in time, against the image, as the agent does."""
    base = load_manifest(rig.appliance.site.pool, mid)
    assert isinstance(base, TreeManifest)
    with fusemount.point_in_time(record, ConsistencyMode.AUTO) as cut:
        _, manifest, _ = tree.capture_tree(
            rig.appliance.site.pool,
            cut.path,
            base=base,
            base_id=mid,
            recheck=cut.recheck,
            identity=cut.identity,
        )
        return manifest, cut.cut.value


def restored(rig: Rig, manifest: TreeManifest, name: str) -> dict[str, bytes]:
    out = rig.tmp / name
    tree.restore_tree(rig.appliance.site.pool, manifest, out)
    return files_of(out)


@pytest.fixture
def disks(rig: Rig) -> Iterator[tuple[Rig, object]]:
    with loop_mounts(rig.tmp) as mkfs:
        try:
            yield rig, mkfs
        finally:
            if IMAGE in rig.mounts():
                rig.unmount()
            fusemount.release_all(rig.agent_dir)


@pytest.mark.parametrize("fstype", ["btrfs", "xfs"])
def test_a_failover_copy_is_cut_at_one_instant_while_a_writer_goes_on(
    disks: tuple[Rig, object], fstype: str
) -> None:
    rig, mkfs = disks
    source, mid = make_tree(rig)
    fs = mkfs(fstype)  # type: ignore[operator]
    target = fs / "app"
    record = present_beside(rig, mid, target)
    layer = Path(str(record["dir"]))
    # The layer is on the file system the operator chose, beside the copy.
    assert layer == fs / f".tandem-layer-{IMAGE}"
    assert (rig.agent_dir / "layers" / IMAGE).resolve() == layer

    # What the app did at DR before: a deletion, a rename, a replaced folder.
    os.unlink(target / "sub" / "f0")
    os.rename(target / "top.txt", target / "renamed.txt")
    shutil.rmtree(target / "empty")
    (target / "empty").mkdir()
    (target / "empty" / "inside").write_text("new folder")
    shutil.rmtree(target / "sub")  # replaced: the image's files under it are gone
    (target / "sub").mkdir()
    (target / "sub" / "only").write_text("only this")
    expected = files_of(target)

    with PairWriter(target, PAIRS, size=64 * 1024) as writer:
        manifests = []
        for _ in range(2):
            manifest, how = capture_cut(rig, record, mid)
            assert how == "reflink"  # clones checked with writes held: one instant
            manifests.append(manifest)
        assert writer.rounds > 1
    for i, manifest in enumerate(manifests):
        got = restored(rig, manifest, f"cut{i}")
        assert torn(got, PAIRS) == []
        assert {k: v for k, v in got.items() if not k.startswith("pair")} == expected
    # Nothing of the cut is left behind, in the layer or beside the copy.
    assert sorted(p.name for p in layer.iterdir() if p.name.startswith((".tandem", "cut-"))) == []
    assert not any(p.name.startswith(".tandem-pit") for p in fs.iterdir())

    # The copy stopped: read as it is, it is the copy.
    manifest, _ = capture_cut(rig, record, mid)
    assert restored(rig, manifest, "final") == files_of(target)
    assert files_of(source)["hard.txt"] == restored(rig, manifest, "final2")["hard.txt"]

    # Unmounting removes the copy, its layer and the agent's link to it.
    assert rig.unmount().status_code == 200
    assert not target.exists() and not layer.exists()
    assert not (rig.agent_dir / "layers" / IMAGE).exists()


def test_a_failover_copy_with_no_cut_under_a_writer_fails_cleanly_never_torn(
    disks: tuple[Rig, object],
) -> None:
    rig, mkfs = disks
    _, mid = make_tree(rig)
    target = mkfs("ext4") / "app"  # type: ignore[operator]
    record = present_beside(rig, mid, target)
    with PairWriter(target, PAIRS, size=64 * 1024):
        for _ in range(2):
            try:
                manifest, how = capture_cut(rig, record, mid)
            except SourceChanged:
                continue  # refused: never a torn success
            assert how == "crash-unsafe"
            assert torn(restored(rig, manifest, "live"), PAIRS) == []
    manifest, how = capture_cut(rig, record, mid)  # the writer stopped
    assert how == "crash-unsafe"
    assert restored(rig, manifest, "stopped") == files_of(target)


def test_a_failover_copy_serves_through_agent_restarts_and_comes_back_after_a_reboot(
    disks: tuple[Rig, object],
) -> None:
    rig, mkfs = disks
    source, mid = make_tree(rig)
    target = mkfs("xfs") / "app"  # type: ignore[operator]
    record = present_beside(rig, mid, target)
    (target / "written.txt").write_text("written at DR")
    rig.stop_agent()
    assert os.path.ismount(target) and (target / "written.txt").read_text() == "written at DR"
    # What a reboot does: the mounts and the FUSE server are gone; the layer stays on disk.
    subprocess.run(["umount", "-l", str(target)], check=True)
    subprocess.run(["fusermount3", "-u", "-z", str(Path(str(record["dir"])) / "lower")], check=True)
    os.kill(int(str(record["pid"])), 9)
    rig.start_agent()
    wait_for(lambda: os.path.ismount(target), 30, "the copy mounted again")
    assert (target / "written.txt").read_text() == "written at DR"
    assert (target / "top.txt").read_text() == (source / "top.txt").read_text()
    assert rig.unmount().status_code == 200
    assert not target.exists() and not Path(str(record["dir"])).exists()


def test_a_mount_point_whose_folder_the_overlay_cannot_name_gets_a_full_copy(
    disks: tuple[Rig, object],
) -> None:
    rig, _ = disks
    source, mid = make_tree(rig)
    target = rig.tmp / "odd,folder" / "app"
    body = rig.body(mid, mount_point=str(target), presentation="fuse", layer="beside")
    answer = rig.http.post("/api/v1/materialize", json=body)
    events = [json.loads(line) for line in answer.text.splitlines()]
    done = events[-1]
    assert done["event"] == "done" and done.get("presentation") is None, done
    said = [e["text"] for e in events if e["event"] == "log"]
    assert any("a full copy, not a virtual one" in t and "odd,folder" in t for t in said), said
    assert not os.path.ismount(target) and files_of(target) == files_of(source)
    assert rig.unmount().status_code == 200
