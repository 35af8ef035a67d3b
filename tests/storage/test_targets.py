"""Restore targets are opened from / without following a symlink: a link swapped in for the
target or for a folder above it never leads a restore into another folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tandem.errors import TargetInvalid
from tandem.storage import targets, tree_restore, volume
from tandem.storage.manifest import TreeManifest, load_manifest
from tandem.storage.pool import ChunkPool
from tandem.storage.tree import capture_tree, restore_tree
from tandem.storage.volume import capture_volume, restore_volume


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file's content and every folder under ``root``."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else p.read_bytes()
    return out


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A folder that no restore may touch: its files would be deleted as extraneous."""
    v = tmp_path / "victim"
    (v / "sub").mkdir(parents=True)
    (v / "precious.txt").write_text("keep me\n")
    (v / "sub" / "more.bin").write_bytes(os.urandom(5000))
    return v


def image_of(pool: ChunkPool, tmp_path: Path) -> TreeManifest:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("image\n")
    mid, _, _ = capture_tree(pool, src)
    manifest = load_manifest(pool, mid)
    assert isinstance(manifest, TreeManifest)
    return manifest


def test_a_root_swapped_for_a_symlink_is_refused_and_its_target_untouched(
    pool: ChunkPool, tmp_path: Path, victim: Path
) -> None:
    manifest = image_of(pool, tmp_path)
    app = tmp_path / "app"
    app.symlink_to(victim)
    before = snapshot(victim)
    with pytest.raises(TargetInvalid, match="symbolic link") as err:
        restore_tree(pool, manifest, app)
    assert str(app) in err.value.message
    assert snapshot(victim) == before
    assert app.is_symlink()


def test_a_symlink_in_the_middle_of_the_path_is_refused(
    pool: ChunkPool, tmp_path: Path, victim: Path
) -> None:
    manifest = image_of(pool, tmp_path)
    (tmp_path / "srv").symlink_to(victim.parent)
    target = tmp_path / "srv" / "victim"  # resolves to the victim through the link
    before = snapshot(victim)
    with pytest.raises(TargetInvalid, match=r"symbolic link \(.*/srv\)"):
        restore_tree(pool, manifest, target)
    assert snapshot(victim) == before
    # Nor does it make a missing folder under a link.
    with pytest.raises(TargetInvalid, match="symbolic link"):
        restore_tree(pool, manifest, tmp_path / "srv" / "new" / "deeper")
    assert not (victim.parent / "new").exists()


def test_the_root_folder_is_never_a_tree_target() -> None:
    # (Checked where the restore opens its root, not by a restore onto /: were the check
    # gone, that test would write into this machine's root folder.)
    for root in ("/", "//", "/."):
        with pytest.raises(TargetInvalid, match="root folder"):
            tree_restore._open_target_root(root)


def test_missing_folders_are_made_and_a_real_path_restores(pool: ChunkPool, tmp_path: Path) -> None:
    manifest = image_of(pool, tmp_path)
    target = tmp_path / "x" / "y" / "z"
    restore_tree(pool, manifest, target)
    assert (target / "a.txt").read_text() == "image\n"


def test_a_volume_target_that_is_a_symlink_is_refused(pool: ChunkPool, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    src.write_bytes(os.urandom(300_000))
    _, manifest, _ = capture_volume(pool, src)
    other = tmp_path / "other.img"
    other.write_bytes(b"other data")
    link = tmp_path / "vol.img"
    link.symlink_to(other)
    with pytest.raises(TargetInvalid, match="symbolic link"):
        restore_volume(pool, manifest, link)
    assert other.read_bytes() == b"other data"
    (tmp_path / "d").symlink_to(tmp_path)
    with pytest.raises(TargetInvalid, match="symbolic link"):
        restore_volume(pool, manifest, tmp_path / "d" / "other.img")
    assert other.read_bytes() == b"other data"
    assert volume.seal(link) is None  # sealing does not follow the link either
    restore_volume(pool, manifest, tmp_path / "real.img")
    assert (tmp_path / "real.img").read_bytes() == src.read_bytes()


def test_a_volume_target_with_another_name_is_refused(pool: ChunkPool, tmp_path: Path) -> None:
    """Whoever may write the app's folder could make its disk image a hard link to a file
    elsewhere (where protected_hardlinks is off); writing the image in place would then
    overwrite that file. A tree restore replaces such files; a volume target is refused."""
    src = tmp_path / "disk.img"
    src.write_bytes(os.urandom(300_000))
    _, manifest, _ = capture_volume(pool, src)
    other = tmp_path / "elsewhere.conf"
    other.write_bytes(b"not the app's\n")
    os.link(other, tmp_path / "vol.img")
    with pytest.raises(TargetInvalid, match="hard link"):
        restore_volume(pool, manifest, tmp_path / "vol.img")
    assert other.read_bytes() == b"not the app's\n"


def test_inspect_reports_what_is_there(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    seen = {
        name: targets.inspect(str(tmp_path / name)).as_dict()
        for name in ("empty", "full", "file", "link", "missing", "missing/deeper")
    }
    assert seen == {
        "empty": {"exists": True, "empty": True, "kind": "folder"},
        "full": {"exists": True, "empty": False, "kind": "folder"},
        "file": {"exists": True, "empty": False, "kind": "file"},
        "link": {"exists": True, "empty": False, "kind": "symlink"},
        "missing": {"exists": False, "empty": True, "kind": "missing"},
        "missing/deeper": {"exists": False, "empty": True, "kind": "missing"},
    }
    with pytest.raises(TargetInvalid, match="symbolic link"):
        targets.inspect(str(tmp_path / "link" / "inside"))
