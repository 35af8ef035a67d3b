"""Where the agent writes an image (a mount point, a clone, a new failback target), no symlink
is followed, and the appliance can ask beforehand what is at a path (``/api/v1/target/check``).
A real agent and appliance, as in ``test_mounts``."""

from __future__ import annotations

import json

from tests.agent.test_mounts import IMAGE, Rig, booted, catalog_url, files_of, make_tree, rig

__all__ = ["booted", "catalog_url", "rig"]


def test_a_mount_point_under_a_symlinked_folder_is_refused_and_nothing_made_there(
    rig: Rig,
) -> None:
    _, mid = make_tree(rig)
    real = rig.tmp / "real"
    real.mkdir()
    (rig.tmp / "link").symlink_to(real)
    for target in (rig.tmp / "link" / "app", rig.tmp / "link" / "deeper" / "app"):
        done = rig.materialize(rig.body(mid, mount_point=str(target)))
        assert done["error"] == "TargetInvalid", done
        assert (
            f"a component of the path is a symbolic link ({rig.tmp / 'link'})" in (done["message"])
        )
        assert list(real.iterdir()) == []
    assert rig.mounts() == {}


def test_a_clone_onto_a_symlink_to_an_empty_folder_is_refused(rig: Rig) -> None:
    _, mid = make_tree(rig)
    real = rig.tmp / "real"
    real.mkdir()
    (rig.tmp / "link").symlink_to(real)
    for path in (rig.tmp / "link", rig.tmp / "link" / "clone"):
        body = {
            "kind": "filesystem",
            "path": str(path),
            "manifest": mid.hex(),
            "appliance": rig.session(mid),
            "new_only": True,
        }
        resp = rig.http.post("/api/v1/restore", json=body)
        assert resp.status_code == 200, resp.text
        last = json.loads(resp.text.splitlines()[-1])
        assert last["error"] == "TargetInvalid", last
        assert "symbolic link" in last["message"]
    assert list(real.iterdir()) == []
    clone = rig.tmp / "fresh" / "clone"
    body = {
        "kind": "filesystem",
        "path": str(clone),
        "manifest": mid.hex(),
        "appliance": rig.session(mid),
        "new_only": True,
    }
    resp = rig.http.post("/api/v1/restore", json=body)
    assert json.loads(resp.text.splitlines()[-1])["event"] == "done", resp.text
    assert files_of(clone) == files_of(rig.tmp / "source")


def test_target_check_answers_what_is_at_a_path(rig: Rig) -> None:
    (rig.tmp / "empty").mkdir()
    (rig.tmp / "full").mkdir()
    (rig.tmp / "full" / "f").write_text("x")
    (rig.tmp / "file").write_text("x")
    (rig.tmp / "link").symlink_to(rig.tmp / "empty")

    def check(kind: str, name: str) -> dict[str, object]:
        resp = rig.http.post(
            "/api/v1/target/check", json={"kind": kind, "path": str(rig.tmp / name)}
        )
        assert resp.status_code == 200, resp.text
        answer: dict[str, object] = resp.json()
        return answer

    assert check("filesystem", "missing/deeper") == {
        "exists": False,
        "empty": True,
        "kind": "missing",
        "usable": True,
    }
    assert check("filesystem", "empty") == {
        "exists": True,
        "empty": True,
        "kind": "folder",
        "usable": True,
    }
    assert check("filesystem", "full")["usable"] is False
    assert check("filesystem", "file")["usable"] is False
    assert check("filesystem", "link") == {
        "exists": True,
        "empty": False,
        "kind": "symlink",
        "usable": False,
    }
    assert check("volume", "empty")["usable"] is False  # a volume is written only where none is
    assert check("volume", "missing")["usable"] is True

    under_link = rig.http.post(
        "/api/v1/target/check", json={"kind": "filesystem", "path": str(rig.tmp / "link" / "x")}
    )
    assert under_link.status_code == 422 and under_link.json()["error"] == "TargetInvalid"
    assert "symbolic link" in under_link.json()["message"]
    relative = rig.http.post("/api/v1/target/check", json={"kind": "filesystem", "path": "a/b"})
    assert relative.status_code == 422
    assert list((rig.tmp / "empty").iterdir()) == []


def test_unmount_follows_no_symlink_put_in_place_of_a_folder_above_the_mount_point(
    rig: Rig,
) -> None:
    source, mid = make_tree(rig)
    target = rig.tmp / "mnt" / "made" / "app"  # made/ and app/ are the agent's own
    (rig.tmp / "mnt").mkdir()
    assert rig.materialize(rig.body(mid, mount_point=str(target)))["event"] == "done"
    elsewhere = rig.tmp / "elsewhere"
    (elsewhere / "made" / "app").mkdir(parents=True)
    (elsewhere / "made" / "app" / "theirs.txt").write_text("not the agent's\n")
    (rig.tmp / "mnt").rename(rig.tmp / "mnt-moved")
    (rig.tmp / "mnt").symlink_to(elsewhere)
    resp = rig.unmount()
    assert resp.status_code == 422 and resp.json()["error"] == "TargetInvalid"
    assert "will not be followed" in resp.json()["message"]
    assert (elsewhere / "made" / "app" / "theirs.txt").read_text() == "not the agent's\n"
    assert files_of(rig.tmp / "mnt-moved" / "made" / "app") == files_of(source)
    assert IMAGE in rig.mounts()
    (rig.tmp / "mnt").unlink()
    (rig.tmp / "mnt-moved").rename(rig.tmp / "mnt")
    assert rig.unmount().status_code == 200
    assert list((rig.tmp / "mnt").iterdir()) == []
