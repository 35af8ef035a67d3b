"""File-tree images presented as writable virtual copies (FUSE + a copy-on-write layer), by a
real agent reading from a real appliance's read session, both served over HTTPS in-process;
the FUSE server is the agent's real child process and the mounts are real."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.agent import fusemount
from tandem.drill.lab import wait_for
from tandem.errors import SourceChanged
from tandem.storage import tree
from tandem.storage.manifest import TreeManifest, load_manifest
from tests.agent.test_mounts import IMAGE, Rig, files_of, rig
from tests.appliance.conftest import booted
from tests.catalog.conftest import catalog_url

__all__ = ["booted", "catalog_url", "rig"]

MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"),
    reason="needs root, /dev/fuse and fusermount3 (Debian's fuse3)",
)


def make_tree(rig: Rig, big: int = 0) -> tuple[Path, bytes]:
    source = rig.tmp / "source"
    (source / "sub").mkdir(parents=True)
    (source / "empty").mkdir()
    for i in range(4):
        (source / "sub" / f"f{i}").write_bytes(os.urandom(60_000 + i))
    (source / "top.txt").write_text("top\n")
    os.symlink("top.txt", source / "link")
    os.link(source / "top.txt", source / "hard.txt")
    if big:
        (source / "big.bin").write_bytes(os.urandom(big))
    with open(source / "sparse.img", "wb") as fh:
        fh.truncate(64 * MiB)
        fh.seek(32 * MiB)
        fh.write(b"middle")
    mid, _, _ = tree.capture_tree(rig.appliance.site.pool, source)
    return source, mid


def fuse_body(rig: Rig, mid: bytes, target: Path) -> dict[str, object]:
    return rig.body(mid, mount_point=str(target), presentation="fuse")


def stats(rig: Rig) -> dict[str, int]:
    entry = rig.mounts()[IMAGE]
    return fusemount.read_stats(entry["layers"][0])


@pytest.fixture
def presented(rig: Rig) -> Iterator[tuple[Rig, Path, Path, bytes]]:
    source, mid = make_tree(rig, big=8 * MiB)
    target = rig.tmp / "mnt" / "app"
    done = rig.materialize(fuse_body(rig, mid, target))
    assert done["event"] == "done", done
    try:
        yield rig, source, target, mid
    finally:
        if IMAGE in rig.mounts():
            rig.unmount()
        fusemount.release_all(rig.agent_dir)  # a failed test leaves no mount behind


def test_a_presented_tree_reads_back_equal_and_fetches_only_what_is_read(
    presented: tuple[Rig, Path, Path, bytes],
) -> None:
    rig, source, target, _ = presented
    assert os.path.ismount(target)
    assert stats(rig)["fetched"] == 0  # presenting read no file content at all
    assert sorted(os.listdir(target)) == sorted(os.listdir(source))
    st, src = os.lstat(target / "sub" / "f2"), os.lstat(source / "sub" / "f2")
    assert (st.st_size, st.st_mtime_ns, st.st_mode) == (src.st_size, src.st_mtime_ns, src.st_mode)
    assert os.readlink(target / "link") == "top.txt"
    assert (target / "hard.txt").stat().st_ino == (target / "top.txt").stat().st_ino
    assert stats(rig)["fetched"] == 0  # ls, stat, readlink: the manifest answers

    assert (target / "top.txt").read_text() == "top\n"
    with open(target / "sparse.img", "rb") as fh:
        fh.seek(32 * MiB)
        assert fh.read(6) == b"middle"
    fetched = stats(rig)["fetched"]
    assert 0 < fetched < 1 * MiB  # not the 8 MiB file, not the 64 MiB sparse one

    small = {k: v for k, v in files_of(source).items() if k != "big.bin"}
    assert {k: v for k, v in files_of(target).items() if k != "big.bin"} == small
    assert (target / "big.bin").read_bytes() == (source / "big.bin").read_bytes()
    assert stats(rig)["fetched"] <= fetched + 8 * MiB + sum(map(len, small.values())) + MiB


def test_writes_land_in_the_layer_and_the_image_is_unchanged(
    presented: tuple[Rig, Path, Path, bytes],
) -> None:
    rig, source, target, mid = presented
    layer = Path(rig.mounts()[IMAGE]["layers"][0]["dir"])
    (target / "new.txt").write_text("new")
    with open(target / "sub" / "f1", "r+b") as fh:
        fh.write(b"CHANGED")
        fh.flush()
        os.fsync(fh.fileno())
    os.unlink(target / "sub" / "f0")
    os.rename(target / "top.txt", target / "renamed.txt")
    (target / "dir" / "deep").mkdir(parents=True)
    os.chmod(target / "sub" / "f3", 0o600)
    os.truncate(target / "sub" / "f2", 10)
    os.symlink("renamed.txt", target / "newlink")

    assert (target / "sub" / "f1").read_bytes()[:7] == b"CHANGED"
    assert not (target / "sub" / "f0").exists() and (target / "renamed.txt").exists()
    assert os.path.getsize(target / "sub" / "f2") == 10
    written, deleted = fusemount.changed_paths(layer / "upper")
    assert {"new.txt", "sub/f1", "sub/f2", "sub/f3", "renamed.txt", "dir/deep", "newlink"} <= set(
        written
    )
    assert {"sub/f0", "top.txt"} <= set(deleted)
    assert "sub/f4" not in written and "empty" not in written

    # The image in the pool is what it was: a copy of it still equals the source.
    manifest = load_manifest(rig.appliance.site.pool, mid)
    assert isinstance(manifest, TreeManifest)
    again = rig.tmp / "again"
    tree.restore_tree(rig.appliance.site.pool, manifest, again)
    assert files_of(again) == files_of(source)


def test_a_capture_of_the_copy_reads_only_what_changed(
    presented: tuple[Rig, Path, Path, bytes],
) -> None:
    rig, source, target, mid = presented
    (target / "sub" / "f1").write_bytes(b"rewritten")
    before = stats(rig)["fetched"]
    base = load_manifest(rig.appliance.site.pool, mid)
    assert isinstance(base, TreeManifest)
    _, manifest, capture = tree.capture_tree(
        rig.appliance.site.pool, target, base=base, base_id=mid
    )
    assert capture.bytes_read <= 2 * MiB  # f1 (and at most a few chunks), not the 8 MiB file
    assert stats(rig)["fetched"] - before < MiB
    files = {e.path: e for e in manifest.entries}
    assert files["big.bin"].chunks == {e.path: e for e in base.entries}["big.bin"].chunks
    restored = rig.tmp / "restored"
    tree.restore_tree(rig.appliance.site.pool, manifest, restored)
    expected = files_of(source)
    expected["sub/f1"] = b"rewritten"
    assert files_of(restored) == expected


def test_unmount_is_refused_while_a_file_is_open_then_removes_everything(
    presented: tuple[Rig, Path, Path, bytes],
) -> None:
    rig, _, target, _ = presented
    layer = Path(rig.mounts()[IMAGE]["layers"][0]["dir"])
    pid = rig.mounts()[IMAGE]["layers"][0]["pid"]
    holder = subprocess.Popen(["sleep", "600"], cwd=target / "sub")
    try:
        resp = rig.unmount()
        assert resp.status_code == 409, resp.text
        assert "in use" in resp.json()["message"] and "sleep" in resp.json()["message"]
        assert os.path.ismount(target) and (target / "top.txt").read_text() == "top\n"
    finally:
        holder.kill()
        holder.wait()
    resp = rig.unmount()
    assert resp.status_code == 200, resp.text
    assert not os.path.exists(target) and not layer.exists()
    assert not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text()
    with open("/proc/self/mountinfo") as fh:
        assert str(target) not in fh.read()
    assert rig.mounts() == {}


def test_a_full_disk_under_the_layer_gives_enospc_and_keeps_acknowledged_writes(
    rig: Rig,
) -> None:
    _, mid = make_tree(rig)
    layers = fusemount.layers_dir(rig.agent_dir)
    layers.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tandem-test", str(layers)], check=True
    )
    try:
        target = rig.tmp / "copy"
        done = rig.materialize(fuse_body(rig, mid, target))
        assert done["event"] == "done", done
        kept = os.urandom(MiB)
        with open(target / "kept.bin", "wb") as fh:
            fh.write(kept)
            fh.flush()
            os.fsync(fh.fileno())
        with pytest.raises(OSError) as info, open(target / "fill.bin", "wb") as fh:
            for _ in range(8):
                fh.write(os.urandom(MiB))
                fh.flush()
                os.fsync(fh.fileno())
        assert info.value.errno == 28  # ENOSPC
        assert (target / "kept.bin").read_bytes() == kept
        assert (target / "top.txt").read_text() == "top\n"
        assert rig.unmount().status_code == 200
    finally:
        fusemount.release_all(rig.agent_dir)
        subprocess.run(["umount", str(layers)], check=False)


def test_the_registry_records_the_layer_and_its_server(
    presented: tuple[Rig, Path, Path, bytes],
) -> None:
    rig, _, target, _ = presented
    entry = rig.mounts()[IMAGE]
    assert entry["presentation"] == "fuse" and entry["state"] == "ready"
    (record,) = entry["layers"]
    assert record["path"] == str(target) and record["pid"] > 0
    config = json.loads((Path(record["dir"]) / "config.json").read_text())
    assert oct(os.stat(Path(record["dir"]) / "config.json").st_mode & 0o777) == "0o600"
    assert config["lower"] == str(Path(record["dir"]) / "lower")


def test_a_write_while_the_copy_is_captured_is_never_torn_into_the_image(
    presented: tuple[Rig, Path, Path, bytes],
) -> None:
    rig, _, target, mid = presented
    (target / "sub" / "f1").write_bytes(b"first version")
    base = load_manifest(rig.appliance.site.pool, mid)
    assert isinstance(base, TreeManifest)
    wrote: list[str] = []

    def meanwhile(path: str) -> None:  # a client writes through the copy as it is read
        if path.endswith("sub/f1") and not wrote:
            wrote.append(path)
            with open(target / "sub" / "f1", "ab") as fh:
                fh.write(b" and more")

    try:
        _, manifest, _ = tree.capture_tree(
            rig.appliance.site.pool, target, base=base, base_id=mid, on_read=meanwhile
        )
    except SourceChanged:
        manifest = None  # refused: also never torn
    assert wrote
    assert (target / "sub" / "f1").read_bytes() == b"first version and more"
    if manifest is not None:  # the file was read again after the write: whole, not torn
        restored = rig.tmp / "after"
        tree.restore_tree(rig.appliance.site.pool, manifest, restored)
        assert (restored / "sub" / "f1").read_bytes() == b"first version and more"


def test_a_copy_whose_mounts_are_gone_comes_back_with_its_writes_when_the_agent_starts(
    presented: tuple[Rig, Path, Path, bytes],
) -> None:
    rig, source, target, _ = presented
    (target / "written.txt").write_text("kept across the reboot")
    record = rig.mounts()[IMAGE]["layers"][0]
    rig.stop_agent()
    # What a reboot does: the mounts and the FUSE server are gone; the layer stays on disk.
    subprocess.run(["umount", "-l", str(target)], check=True)
    subprocess.run(["fusermount3", "-u", "-z", str(Path(record["dir"]) / "lower")], check=True)
    os.kill(record["pid"], 9)
    assert not os.path.ismount(target)
    rig.start_agent()
    wait_for(lambda: os.path.ismount(target), 30, "the copy mounted again")
    assert (target / "written.txt").read_text() == "kept across the reboot"
    assert (target / "top.txt").read_text() == (source / "top.txt").read_text()
    assert rig.mounts()[IMAGE]["layers"][0]["pid"] != record["pid"]
    assert rig.unmount().status_code == 200
    assert not target.exists() and not Path(record["dir"]).exists()


def test_release_takes_every_copy_down_even_in_use_and_unmount_then_forgets_it(
    presented: tuple[Rig, Path, Path, bytes],
) -> None:
    rig, _, target, _ = presented
    record = rig.mounts()[IMAGE]["layers"][0]
    holder = subprocess.Popen(["sleep", "600"], cwd=target)
    try:
        assert fusemount.release_all(rig.agent_dir) == [str(target)]
    finally:
        holder.kill()
        holder.wait()
    assert not os.path.ismount(target) and not Path(record["dir"]).exists()
    wait_for(
        lambda: (
            not os.path.exists(f"/proc/{record['pid']}/cmdline")
            or not Path(f"/proc/{record['pid']}/cmdline").read_bytes()
        ),
        30,
        "the server gone",
    )
    assert rig.unmount().status_code == 200
    assert rig.mounts() == {} and not target.exists()
