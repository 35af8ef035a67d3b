"""DR lifecycle I through the CLI with real daemons: test failover, failover, mount, unmount,
image delete — and an NBD client reading a test-failover export."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Drill, protect_and_replicate, wait_for

MiB = 1024 * 1024


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: apt-get install {package}")
    return path


def digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes()).hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_volume_test_failover_over_nbd(drill: Drill, tmp_path: Path) -> None:
    d = drill
    qemu_img = need("qemu-img", "qemu-utils")
    nbdcopy = need("nbdcopy", "libnbd-bin")
    volume = tmp_path / "disk.img"
    volume.write_bytes(os.urandom(12 * MiB))
    original = tmp_path / "original.img"
    shutil.copyfile(volume, original)
    snap = protect_and_replicate(d, "db", "volume", volume)

    result = d.b("test-failover", "db", "--host", "host2")
    test_image = result["image"]
    assert test_image["kind"] == "test-failover" and test_image["parent"] == snap["id"]
    uri = result["nbd_uri"]  # the export, in the result of the job this token started
    assert uri.startswith("nbd://") and result["job"]["result"]["nbd_uri"] == uri
    # the image document holds no capability; an operator asks for it (audited)
    assert test_image["nbd_uri"] is None and test_image["nbd_exported"] is True
    exported = d.b("image", "export", test_image["id"])
    assert exported == {"image": test_image["id"], "nbd_uri": uri, "nbd_fingerprint": None}
    assert d.b.run("image", "export", test_image["id"], json_=False).stdout.strip() == uri
    viewer = d.b("token", "add", "watcher", "--role", "viewer")["token"]
    job = d.b("job", "show", result["job"]["id"], token=viewer)
    assert job["result"]["nbd_uri"] is None
    refused = d.b.run("image", "export", test_image["id"], token=viewer, check=False)
    assert refused.code == 1 and "Use a token with the operator role" in refused.error
    secret = uri.rsplit(".", 1)[1]
    assert secret not in d.b.run("image", "show", test_image["id"], token=viewer).stdout

    # a real NBD client reads exactly the replica
    out = tmp_path / "read.raw"
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "raw", uri, str(out)], check=True)
    assert digest(out) == digest(original)

    # writing to the test copy never changes the replica
    scribble = tmp_path / "scribble.raw"
    scribble.write_bytes(os.urandom(12 * MiB))
    subprocess.run([nbdcopy, str(scribble), uri], check=True)
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "raw", uri, str(out)], check=True)
    assert digest(out) == digest(scribble)
    assert d.b("image", "verify", snap["id"])["ok"]
    replica = next(i for i in d.b("images", "db") if i["id"] == snap["id"])
    assert replica["manifest"] == snap["manifest"]

    # replication goes on during the test
    with open(volume, "r+b") as fh:
        fh.write(os.urandom(4096))
    newer = d.a("capture", "db")["image"]
    wait_for(lambda: any(i["id"] == newer["id"] for i in d.b("images", "db")), 60, "replica 2")

    # one test image per host, and a test never goes to the production host
    again = d.b.run("test-failover", "db", "--host", "host2", check=False)
    assert again.code == 1 and "already has the test-failover image" in again.error

    # a mounted image is unmounted before it is deleted, with that fix in the message
    refused = d.b.run("image", "delete", test_image["id"], check=False)
    assert refused.code == 1 and f"tandem unmount {test_image['id']}" in refused.error
    d.b("unmount", test_image["id"])
    gone = subprocess.run([qemu_img, "info", uri], capture_output=True, check=False)
    assert gone.returncode != 0  # the export is gone
    assert d.b("image", "delete", test_image["id"])["job"]["status"] == "succeeded"


def test_filesystem_test_failover_mount_point_rules(drill: Drill, tmp_path: Path) -> None:
    d = drill
    data = tmp_path / "www"
    (data / "static").mkdir(parents=True)
    (data / "index.html").write_text("<h1>production</h1>\n")
    (data / "static" / "app.js").write_bytes(os.urandom(200_000))
    expected = tree_digests(data)
    protect_and_replicate(d, "www", "filesystem", data)

    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    bad = d.b.run(
        "test-failover", "www", "--host", "host2", "--mount-point", str(a_file), check=False
    )
    assert bad.code == 1 and a_file.read_text() == "not a folder"
    assert not any(i["kind"] == "test-failover" for i in d.b("images", "www"))

    target = tmp_path / "dr" / "www-test"
    result = d.b("test-failover", "www", "--host", "host2", "--mount-point", str(target))
    assert result["image"]["mount_point"] == str(target)
    assert tree_digests(target) == expected
    (target / "index.html").write_text("changed in the drill\n")
    d.b("unmount", result["image"]["id"])
    assert not target.exists()
    d.b("image", "delete", result["image"]["id"])


def test_failover_needs_its_confirmation_and_fences_production(
    drill: Drill, tmp_path: Path
) -> None:
    d = drill
    data = tmp_path / "svc"
    data.mkdir()
    (data / "state.txt").write_text("v1\n")
    protect_and_replicate(d, "svc", "filesystem", data)

    for wrong in ("failover", "Failover", "yes"):
        refused = d.b.run("failover", "svc", "--host", "host2", "--confirm", wrong, check=False)
        assert refused.code == 1 and "FAILOVER" in refused.error
    assert next(a for a in d.b("apps") if a["name"] == "svc")["state"] == "managed"

    target = tmp_path / "dr-svc"
    done = d.b(
        "failover",
        "svc",
        "--host",
        "host2",
        "--confirm",
        "FAILOVER",
        "--mount-point",
        str(target),
        "--label",
        "drill",
    )
    assert done["job"]["status"] == "succeeded", done["job"]
    assert done["image"]["kind"] == "failover" and done["image"]["label"] == "drill"
    assert (target / "state.txt").read_text() == "v1\n"
    app_b = next(a for a in d.b("apps") if a["name"] == "svc")
    assert app_b["state"] == "failed-over" and app_b["epoch"] >= 2

    # production was told: it no longer feeds replication, and says why
    app_a = next(a for a in d.a("apps") if a["name"] == "svc")
    assert app_a["peer_active"] and app_a["state"] == "managed"
    (data / "state.txt").write_text("v2 written at production after the failover\n")
    captured = d.a("capture", "svc")
    assert captured["job"]["result"]["mirror_job"] is None
    refused = d.a.run("replicate", "svc", check=False)
    assert refused.code == 1 and "failed over at dr" in refused.error, refused.error
    assert (target / "state.txt").read_text() == "v1\n"  # the DR copy is untouched

    # The failed-over copy (FUSE) goes with the failback, its layer too.
    back = d.b("failback", "svc", "--force")
    assert back["job"]["status"] == "succeeded", back["job"]
    assert not target.exists() and not list(tmp_path.glob(".tandem-layer-*"))


def test_failover_without_a_replica_is_a_clear_error(drill: Drill, tmp_path: Path) -> None:
    d = drill
    data = tmp_path / "lonely"
    data.mkdir()
    d.b("app", "add", "lonely", "--host", "host2", "--kind", "filesystem", "--path", str(data))
    d.b("template", "add", "plain")
    d.b("app", "protect", "lonely", "--template", "plain")
    res = d.b.run("failover", "lonely", "--host", "host2", "--confirm", "FAILOVER", check=False)
    assert res.code == 1 and "replica" in res.error


def test_mount_any_image_and_the_remaining_target_rules(drill: Drill, tmp_path: Path) -> None:
    d = drill
    data = tmp_path / "blog"
    data.mkdir()
    (data / "post.md").write_text("hello\n")
    snap = protect_and_replicate(d, "blog", "filesystem", data)

    # mount: any image (here a snapshot at production), writable, the image unchanged
    where = tmp_path / "blog-mount"
    mounted = d.a("mount", snap["id"], "--host", "host1", "--mount-point", str(where))
    assert mounted["image"]["kind"] == "mount" and (where / "post.md").read_text() == "hello\n"
    (where / "post.md").write_text("edited in the mount\n")
    d.a("unmount", mounted["image"]["id"])
    assert not where.exists()
    assert d.a("image", "verify", snap["id"])["ok"]

    # never onto the host the app runs on in production (a DR host registered by that name)
    d.b(
        "host",
        "add",
        "host1",
        "--url",
        d.dr_agent.url,
        "--token",
        d.dr_agent.token,
        "--fingerprint",
        d.dr_agent.fingerprint,
    )
    same = d.b.run("test-failover", "blog", "--host", "host1", check=False)
    assert same.code != 0 and "runs in production" in same.error

    # the target host must answer: a clear error, and nothing is presented
    d.dr_agent.stop()
    try:
        down = d.b.run(
            "test-failover",
            "blog",
            "--host",
            "host2",
            "--mount-point",
            str(tmp_path / "never"),
            check=False,
        )
        assert down.code == 1 and "host2 unreachable at" in down.error
        assert not (tmp_path / "never").exists()
        assert not [i for i in d.b("images", "blog") if i["kind"] == "test-failover"]
    finally:
        d.dr_agent.start()
