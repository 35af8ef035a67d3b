"""Materializing images on a host (SPEC §2's mount-point rules), through a real agent that
fetches from a real appliance's read session, both served over HTTPS in-process."""

from __future__ import annotations

import json
import os
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tandem.agent import actions, pit
from tandem.agent import app as agent_app
from tandem.agent.mounts import REGISTRY_FILE, VOLUME_FILE, Registry
from tandem.appliance.daemon import Appliance
from tandem.domain.consistency import ConsistencyMode, Cut
from tandem.errors import JobCanceled
from tandem.storage import tree, volume
from tandem.storage.manifest import (
    FILE,
    TreeEntry,
    TreeManifest,
    VolumeManifest,
    decode_manifest,
    store_manifest,
)
from tandem.transport import agent_api
from tandem.transport.server import DaemonConfig, load_daemon_dir
from tests.agent.loopfs import loop_mounts
from tests.appliance.conftest import Booted, booted
from tests.appliance.live import LiveServer, free_port
from tests.catalog.conftest import catalog_url

__all__ = ["booted", "catalog_url"]

MiB = 1024 * 1024
IMAGE = "img_aaaaaaaaaaaa"
OTHER = "img_bbbbbbbbbbbb"


@dataclass
class Rig:
    """An appliance (serving its sessions) and a host agent with its directory."""

    appliance: Appliance
    agent_dir: Path
    cfg: DaemonConfig
    token: str
    tmp: Path
    client: httpx.Client | None = None
    server: LiveServer | None = None

    def start_agent(self) -> None:
        app = agent_app.create_app(self.cfg, self.agent_dir)
        self.server = LiveServer(app, self.agent_dir, self.cfg.port).__enter__()
        context = ssl.create_default_context(cafile=str(self.agent_dir / "cert.pem"))
        context.check_hostname = False
        self.client = httpx.Client(
            base_url=self.cfg.url,
            verify=context,
            timeout=120,
            headers={"Authorization": f"Bearer {self.token}"},
        )

    def stop_agent(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.__exit__(None, None, None)
        self.client = self.server = None

    @property
    def http(self) -> httpx.Client:
        assert self.client is not None
        return self.client

    def session(self, mid: bytes, *, write: bool = False) -> dict[str, str]:
        site = self.appliance.site
        opened, token = site.sessions.open(
            job_id="job_test", write=write, bases=[mid] if write else [], readable=[mid]
        )
        return {
            "url": site.url,
            "fingerprint": site.fingerprint,
            "token": token,
            "session": opened.id,
        }

    def body(self, mid: bytes, **fields: Any) -> dict[str, Any]:
        return {
            "kind": "filesystem",
            "manifest": mid.hex(),
            "appliance": self.session(mid),
            "image": IMAGE,
            "action": "specify",
            **fields,
        }

    def materialize(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST a materialization; returns its last event (``done`` or ``error``)."""
        resp = self.http.post("/api/v1/materialize", json=body)
        assert resp.status_code == 200, resp.text
        events = [json.loads(line) for line in resp.text.splitlines()]
        assert events and all(e["event"] == "progress" for e in events[:-1])
        last: dict[str, Any] = events[-1]
        return last

    def unmount(self, image: str = IMAGE) -> httpx.Response:
        return self.http.post("/api/v1/unmaterialize", json={"image": image})

    def mounts(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.http.get("/api/v1/mounts").json()
        return answer


@pytest.fixture
def rig(booted: Booted, tmp_path: Path) -> Iterator[Rig]:
    appliance = booted.appliance
    agent_dir = tmp_path / "agent"
    info = agent_app.init(agent_dir, "h1", f"127.0.0.1:{free_port()}")
    cfg = load_daemon_dir(agent_dir, "agent")
    with LiveServer(appliance.app, appliance.directory, appliance.config.port):
        rig = Rig(appliance, agent_dir, cfg, info["token"], tmp_path)
        rig.start_agent()
        try:
            yield rig
        finally:
            rig.stop_agent()


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def make_tree(rig: Rig) -> tuple[Path, bytes]:
    """A small source tree captured into the appliance's pool; returns (source, manifest)."""
    source = rig.tmp / "source"
    (source / "sub").mkdir(parents=True)
    (source / "empty").mkdir()
    for i in range(4):
        (source / "sub" / f"f{i}").write_bytes(os.urandom(60_000 + i))
    (source / "top.txt").write_text("top\n")
    mid, _, _ = tree.capture_tree(rig.appliance.site.pool, source)
    return source, mid


def make_volume(rig: Rig, size: int = 9 * MiB) -> tuple[Path, bytes]:
    disk = rig.tmp / "disk.img"
    with open(disk, "wb") as fh:
        fh.write(os.urandom(size // 2))
        fh.truncate(size)  # the second half is a hole: a zero extent in the image
    mid, _, _ = volume.capture_volume(rig.appliance.site.pool, disk)
    return disk, mid


# --- SPEC §2's rules --------------------------------------------------------------------


def test_a_missing_mount_point_is_created_with_its_parents_and_unmount_removes_them(
    rig: Rig,
) -> None:
    source, mid = make_tree(rig)
    mnt = rig.tmp / "mnt"
    mnt.mkdir()
    target = mnt / "a" / "b" / "app"
    done = rig.materialize(rig.body(mid, mount_point=str(target) + "/"))
    assert done["event"] == "done", done
    assert done["paths"] == [str(target)] and done["files"] == []
    assert done["bytes_sent"] >= 4 * 60_000 and done["stats"]["bytes_written"] >= 4 * 60_000
    assert files_of(target) == files_of(source) and (target / "empty").is_dir()

    entry = rig.mounts()[IMAGE]
    assert entry["state"] == "ready" and entry["action"] == "specify"
    assert entry["created"] == [str(mnt / "a"), str(mnt / "a" / "b"), str(target)]
    assert entry["kept"] == {} and entry["time"].endswith("Z")

    resp = rig.unmount()
    assert resp.status_code == 200, resp.text
    assert sorted(resp.json()["removed"]) == sorted(entry["created"])
    assert list(mnt.iterdir()) == [] and rig.mounts() == {}


def test_an_existing_empty_folder_is_used_then_emptied_and_kept(rig: Rig) -> None:
    source, mid = make_tree(rig)
    folder = rig.tmp / "empty-folder"
    folder.mkdir(mode=0o750)
    os.chmod(folder, 0o750)
    done = rig.materialize(rig.body(mid, mount_point=str(folder)))
    assert done["event"] == "done", done
    assert files_of(folder) == files_of(source)
    entry = rig.mounts()[IMAGE]
    assert entry["created"] == [] and list(entry["kept"]) == [str(folder)]

    answer = rig.unmount().json()
    assert answer["kept"] == [str(folder)]
    assert sorted(answer["removed"]) == [str(folder / n) for n in ("empty", "sub", "top.txt")]
    assert folder.is_dir() and list(folder.iterdir()) == []
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750  # the image's root mode is undone


def test_a_file_at_the_mount_point_fails_the_job_and_leaves_nothing(rig: Rig) -> None:
    _, mid = make_tree(rig)
    mnt = rig.tmp / "mnt"
    mnt.mkdir()
    (mnt / "x_2").write_text("not a folder")
    # Two volumes: x_1 would be created, x_2 is a file; every mount point is checked first.
    done = rig.materialize(rig.body(mid, mount_point=str(mnt / "x"), volumes=2))
    assert done["event"] == "error" and done["error"] == "TargetInvalid"
    assert done["message"] == (
        f"Cannot materialize the image at {mnt / 'x_2'}: it is a file. A mount point must be "
        "an empty folder or a missing path (a file or a non-empty folder fails the job); "
        "remove it or choose another mount point."
    )
    assert [p.name for p in mnt.iterdir()] == ["x_2"]
    assert (mnt / "x_2").read_text() == "not a folder"
    assert rig.mounts() == {}


def test_a_non_empty_folder_fails_the_job_untouched(rig: Rig) -> None:
    _, mid = make_tree(rig)
    folder = rig.tmp / "busy"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    before = folder.stat().st_mtime_ns
    done = rig.materialize(rig.body(mid, mount_point=str(folder)))
    assert done["error"] == "TargetInvalid"
    assert "it is a folder that is not empty (1 entries)" in done["message"]
    assert files_of(folder) == {"keep.txt": b"mine"} and folder.stat().st_mtime_ns == before
    assert rig.mounts() == {}


def test_a_symlink_at_the_mount_point_is_not_followed(rig: Rig) -> None:
    _, mid = make_tree(rig)
    real = rig.tmp / "real"
    real.mkdir()
    link = rig.tmp / "link"
    link.symlink_to(real)
    done = rig.materialize(rig.body(mid, mount_point=str(link)))
    assert done["error"] == "TargetInvalid"
    assert "it is a symbolic link, which is not followed" in done["message"]
    assert list(real.iterdir()) == [] and link.is_symlink()


BAD_REQUESTS: list[tuple[dict[str, str], str, str]] = [
    ({"mount_point": "relative/path"}, "MountPathInvalid", "is not a full path"),
    ({"mount_point": "/mnt/../etc"}, "MountPathInvalid", "contains a '..' component"),
    ({"mount_point": "/"}, "MountPathInvalid", "is the root folder"),
    ({}, "MountPointNeeded", "the specify action needs a folder to be placed in"),
    ({"action": "keep-source-path"}, "InvalidInput", "needs the application's source path"),
    (
        {"action": "map-only"},
        "ImageKindDiffers",
        "cannot be presented map-only (a volume without mounting a file system)",
    ),
    (
        {"action": "keep-source-path", "source_path": "/nonexistent-parent/app"},
        "TargetInvalid",
        "its parent folder /nonexistent-parent does not exist",
    ),
    ({"mount_point": "{tmp}/a-file/x"}, "TargetInvalid", "a component of the path is a file"),
]


def test_bad_mount_requests_fail_before_anything_is_touched(rig: Rig) -> None:
    _, mid = make_tree(rig)
    (rig.tmp / "a-file").write_text("x")
    before = sorted(rig.tmp.iterdir())
    for fields, code, message in BAD_REQUESTS:
        fields = {k: v.replace("{tmp}", str(rig.tmp)) for k, v in fields.items()}
        done = rig.materialize(rig.body(mid, **fields))
        assert (done["event"], done["error"]) == ("error", code), fields
        assert message in done["message"], fields
    assert rig.mounts() == {} and sorted(rig.tmp.iterdir()) == before


def test_materialize_requests_are_validated(rig: Rig) -> None:
    changes: list[dict[str, Any]] = [
        {"kind": "vm"},
        {"action": "mount"},
        {"manifest": "xyz"},
        {"volumes": 0},
        {"image": "../x"},
        {"extra": 1},
    ]
    for change in changes:
        body = {**rig.body(b"\x00" * 32, mount_point="/mnt/x"), **change}
        resp = rig.http.post("/api/v1/materialize", json=body)
        assert resp.status_code == 422 and resp.json()["error"] == "InvalidInput", change


def test_a_manifest_of_the_other_kind_is_refused(rig: Rig) -> None:
    _, mid = make_tree(rig)
    target = rig.tmp / "mnt"
    done = rig.materialize(rig.body(mid, kind="volume", mount_point=str(target)))
    assert done["error"] == "ImageKindDiffers" and "is a file-tree image" in done["message"]
    assert not target.exists()


def test_map_only_presents_a_volume_without_touching_the_disk(rig: Rig) -> None:
    _, mid = make_volume(rig, 2 * MiB)
    target = rig.tmp / "never"
    done = rig.materialize(rig.body(mid, kind="volume", action="map-only", mount_point=str(target)))
    assert (done["event"], done["paths"], done["bytes_sent"]) == ("done", [], 0)
    assert not target.exists()
    assert rig.mounts()[IMAGE]["paths"] == []
    assert rig.unmount().json() == {"image": IMAGE, "removed": [], "kept": []}


def test_keep_source_path_puts_the_image_at_the_apps_path(rig: Rig) -> None:
    source, mid = make_tree(rig)
    original = rig.tmp / "srv" / "app"
    original.parent.mkdir()
    done = rig.materialize(
        rig.body(mid, action="keep-source-path", source_path=str(original), mount_point="/x")
    )
    assert done["paths"] == [str(original)]
    assert files_of(original) == files_of(source)
    rig.unmount()
    assert list(original.parent.iterdir()) == []


def test_volumes_go_to_volume_img_under_suffixed_mount_points(rig: Rig) -> None:
    disk, mid = make_volume(rig)
    base = rig.tmp / "vol"
    done = rig.materialize(rig.body(mid, kind="volume", mount_point=str(base), volumes=2))
    assert done["event"] == "done", done
    paths = [str(rig.tmp / "vol_1"), str(rig.tmp / "vol_2")]
    assert done["paths"] == paths
    assert done["files"] == [os.path.join(p, VOLUME_FILE) for p in paths]
    for name in done["files"]:
        assert Path(name).read_bytes() == disk.read_bytes()
    assert done["size"] == 9 * MiB and done["stats"]["bytes_total"] == 18 * MiB
    rig.unmount()
    assert not (rig.tmp / "vol_1").exists() and not (rig.tmp / "vol_2").exists()


def test_the_registry_survives_an_agent_restart(rig: Rig) -> None:
    _, mid = make_tree(rig)
    target = rig.tmp / "mnt" / "app"
    assert rig.materialize(rig.body(mid, mount_point=str(target)))["event"] == "done"
    before = rig.mounts()
    rig.stop_agent()
    on_disk = json.loads((rig.agent_dir / REGISTRY_FILE).read_text())
    assert on_disk == before and on_disk[IMAGE]["paths"] == [str(target)]

    rig.start_agent()
    assert rig.mounts() == before
    assert rig.unmount().status_code == 200
    assert not (rig.tmp / "mnt").exists() and rig.mounts() == {}
    again = rig.unmount()
    assert again.status_code == 404 and again.json()["error"] == "NotFound"
    assert "is not materialized on this host" in again.json()["message"]


def test_an_agent_made_without_its_directory_cannot_materialize(rig: Rig) -> None:
    app = agent_app.create_app(rig.cfg)
    port = free_port()
    context = ssl.create_default_context(cafile=str(rig.agent_dir / "cert.pem"))
    context.check_hostname = False
    with (
        LiveServer(app, rig.agent_dir, port),
        httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=context, timeout=120.0) as client,
    ):
        resp = client.get("/api/v1/mounts", headers={"Authorization": f"Bearer {rig.token}"})
    assert resp.status_code == 500 and "made without its directory" in resp.json()["message"]


# --- failures later on -------------------------------------------------------------------


def _broken_tree(rig: Rig) -> bytes:
    """A tree image whose last file names a chunk the pool lacks: the restore fails after
    the folders and the other files were written."""
    _, mid = make_tree(rig)
    pool = rig.appliance.site.pool
    good = decode_manifest(pool.get_manifest_blob(mid), mid)
    assert isinstance(good, TreeManifest)
    lost = TreeEntry(
        "zz-lost", FILE, 0o644, os.getuid(), os.getgid(), 0, 10, "", [(b"\x01" * 32, 10)]
    )
    with pool.writer() as writer:
        return store_manifest(writer, TreeManifest([*good.entries, lost], good.meta))


def test_a_broken_transfer_removes_the_folders_it_made(rig: Rig) -> None:
    mid = _broken_tree(rig)
    mnt = rig.tmp / "mnt"
    mnt.mkdir()
    done = rig.materialize(rig.body(mid, mount_point=str(mnt / "deep" / "app")))
    assert (done["event"], done["error"]) == ("error", "ChunkMissing")
    assert list(mnt.iterdir()) == [] and rig.mounts() == {}


def test_a_broken_transfer_empties_a_pre_existing_folder_and_keeps_it(rig: Rig) -> None:
    _, good = make_volume(rig, 8 * MiB)
    pool = rig.appliance.site.pool
    image = decode_manifest(pool.get_manifest_blob(good), good)
    assert isinstance(image, VolumeManifest)
    broken = VolumeManifest(image.size, [image.chunks[0], b"\x02" * 32], image.chunk_size)
    with pool.writer() as writer:
        mid = store_manifest(writer, broken)
    folder = rig.tmp / "kept"
    folder.mkdir()
    done = rig.materialize(rig.body(mid, kind="volume", mount_point=str(folder)))
    assert done["error"] == "ChunkMissing"
    assert folder.is_dir() and list(folder.iterdir()) == [] and rig.mounts() == {}


def test_a_materialization_abandoned_part_way_removes_what_it_wrote(rig: Rig) -> None:
    # What the agent does when the appliance hangs up: its next progress report raises.
    _, mid = make_volume(rig)
    (rig.tmp / "vol_1").mkdir()
    written: list[int] = []

    def emit(event: dict[str, Any]) -> None:
        if event["done"]:
            written.append(os.path.getsize(rig.tmp / "vol_1" / VOLUME_FILE))
            raise JobCanceled(job="job_test")

    req = agent_api.MaterializeRequest(
        kind="volume",
        manifest=mid.hex(),
        appliance=agent_api.ApplianceSession(**rig.session(mid)),
        image=IMAGE,
        mount_point=str(rig.tmp / "vol"),
        volumes=2,
    )
    with pytest.raises(JobCanceled):
        actions.materialize(req, Registry(rig.agent_dir), emit)
    assert written == [9 * MiB]  # volume.img was there when the job was abandoned
    assert list((rig.tmp / "vol_1").iterdir()) == [] and not (rig.tmp / "vol_2").exists()
    assert rig.mounts() == {}


def test_a_symlink_put_in_place_of_a_mount_point_is_not_followed_on_unmount(rig: Rig) -> None:
    source, mid = make_tree(rig)
    target = rig.tmp / "app"
    assert rig.materialize(rig.body(mid, mount_point=str(target)))["event"] == "done"
    moved = rig.tmp / "moved"
    target.rename(moved)
    target.symlink_to(moved)
    resp = rig.unmount()
    assert resp.status_code == 422 and resp.json()["error"] == "TargetInvalid"
    assert "is no longer a folder" in resp.json()["message"]
    assert files_of(moved) == files_of(source) and IMAGE in rig.mounts()
    target.unlink()
    assert rig.unmount().json()["removed"] == []  # the mount point is gone: nothing to do


def test_mount_points_never_nest_and_an_image_is_materialized_once(rig: Rig) -> None:
    _, mid = make_tree(rig)
    target = rig.tmp / "app"
    assert rig.materialize(rig.body(mid, mount_point=str(target)))["event"] == "done"
    twice = rig.materialize(rig.body(mid, mount_point=str(rig.tmp / "elsewhere")))
    assert twice["error"] == "AlreadyMaterialized" and "already materialized" in twice["message"]
    inside = rig.materialize(rig.body(mid, image=OTHER, mount_point=str(target / "nested")))
    assert (
        inside["error"] == "MountPointTaken"
        and f"where image {IMAGE} is materialized" in (inside["message"])
    )
    assert not (target / "nested").exists() and not (rig.tmp / "elsewhere").exists()
    home = rig.materialize(rig.body(mid, image=OTHER, mount_point=str(rig.agent_dir / "x")))
    assert home["error"] == "MountPointOverlaps" and "agent's own directory" in home["message"]
    bad = rig.http.post("/api/v1/unmaterialize", json={"image": "../x"})
    assert bad.status_code == 422


# --- capturing a materialized path -------------------------------------------------------


def test_capturing_a_materialized_tree_sends_only_what_changed(rig: Rig) -> None:
    _, mid = make_tree(rig)
    target = rig.tmp / "app"
    assert rig.materialize(rig.body(mid, mount_point=str(target)))["event"] == "done"
    changed = os.urandom(70_000)
    (target / "sub" / "f2").write_bytes(changed)

    body = {
        "kind": "filesystem",
        "path": str(target),
        "appliance": rig.session(mid, write=True),
        "base": mid.hex(),
    }
    resp = rig.http.post("/api/v1/capture", json=body)
    done = [json.loads(line) for line in resp.text.splitlines()][-1]
    assert done["event"] == "done", done
    # Every file is read and hashed again (inode and ctime are not the captured ones), but
    # only the changed file's chunk is missing on the appliance, so only it crosses the wire.
    assert done["stats"]["bytes_read"] == 3 * 60_000 + 1 + 3 + len(changed) + 4
    assert len(changed) < done["bytes_sent"] < len(changed) + 20_000, done

    pool = rig.appliance.site.pool
    old = decode_manifest(pool.get_manifest_blob(mid), mid)
    new_id = bytes.fromhex(done["manifest"])
    new = decode_manifest(pool.get_manifest_blob(new_id), new_id)
    assert isinstance(old, TreeManifest) and isinstance(new, TreeManifest)
    diff = tree.diff_trees(old, new)
    assert (diff.added, diff.removed, diff.changed) == ([], [], ["sub/f2"])


def test_a_tree_on_btrfs_is_materialized_as_a_subvolume_and_removed_as_a_folder(
    rig: Rig,
) -> None:
    """A copy the app runs on at DR then syncs back from a snapshot (writes never held)."""
    source, mid = make_tree(rig)
    with loop_mounts(rig.tmp) as mkfs:
        fs = mkfs("btrfs")
        target = fs / "deep" / "app"
        done = rig.materialize(rig.body(mid, mount_point=str(target)))
        assert done["event"] == "done", done
        assert files_of(target) == files_of(source)
        assert pit.is_btrfs_subvolume(str(target))
        assert not pit.is_btrfs_subvolume(str(fs / "deep"))  # parents are plain folders
        assert rig.mounts()[IMAGE]["created"] == [str(fs / "deep"), str(target)]
        with pit.point_in_time(str(target), "filesystem", ConsistencyMode.AUTO) as cut:
            assert cut.cut is Cut.SNAPSHOT_BTRFS
        assert rig.unmount().status_code == 200
        assert sorted(p.name for p in fs.iterdir()) == []
