"""DR lifecycle II through the CLI with real daemons: failover, writes at the DR site,
catch-up and final syncback, restore at production, snapshot-style failback, and mirroring
resuming incrementally — nothing written at the DR site is lost."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from tests.e2e.conftest import Drill, protect_and_replicate, wait_for
from tests.e2e.test_dr_presentation import tree_digests

MiB = 1024 * 1024
CONFIRM = ("--confirm", "DATA LOSS", "--confirm", "OVERWRITE OTHER APPS")


def digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes()).hexdigest()


def test_file_tree_round_trip_loses_nothing(drill: Drill, tmp_path: Path) -> None:
    d = drill
    prod = tmp_path / "shop"
    (prod / "orders").mkdir(parents=True)
    for i in range(20):
        (prod / "orders" / f"{i}.json").write_text(f'{{"order": {i}}}\n')
    (prod / "catalog.bin").write_bytes(os.urandom(3 * MiB))
    protect_and_replicate(d, "shop", "filesystem", prod)

    dr_path = tmp_path / "dr-shop"
    d.b(
        "failover",
        "shop",
        "--host",
        "host2",
        "--confirm",
        "FAILOVER",
        "--mount-point",
        str(dr_path),
    )
    refused = d.b.run("failback", "shop", check=False)
    assert refused.code == 1 and "syncback" in refused.error  # DR writes would be lost

    # the app runs at the DR site and writes
    (dr_path / "orders" / "100.json").write_text('{"order": 100, "site": "dr"}\n')
    (dr_path / "orders" / "3.json").write_text('{"order": 3, "amended": true}\n')
    catch_up = d.b("syncback", "shop", "--label", "catch-up")
    assert catch_up["job"]["status"] == "succeeded", catch_up["job"]
    # downtime starts: the app stops at the DR site; the last writes go in the final syncback
    (dr_path / "orders" / "101.json").write_text('{"order": 101}\n')
    final = d.b("syncback", "shop", "--label", "final")
    assert final["job"]["bytes_sent"] < catch_up["job"]["bytes_sent"]
    at_dr = tree_digests(dr_path)

    not_yet = d.b.run("failback", "shop", check=False)  # the final syncback is not restored
    assert not_yet.code == 1 and "has not restored the newest syncback" in not_yet.error
    syncbacks = [i for i in d.a("images", "shop") if i["kind"] == "syncback"]
    assert [i["id"] for i in syncbacks] == [final["image"]["id"], catch_up["image"]["id"]]
    restored = d.a("restore", "shop", "--image", final["image"]["id"], *CONFIRM)
    assert restored["job"]["status"] == "succeeded", restored["job"]
    assert restored["job"]["result"]["downtime_seconds"] > 0  # measured, on the job
    app_a = next(a for a in d.a("apps") if a["name"] == "shop")
    assert app_a["failback_downtime_seconds"] > 0  # and in `tandem apps`
    assert tree_digests(prod) == at_dr  # production now holds every DR write

    done = d.b("failback", "shop")
    assert done["job"]["status"] == "succeeded", done["job"]
    app_b = next(a for a in d.b("apps") if a["name"] == "shop")
    assert app_b["state"] == "managed"
    kinds = {i["kind"] for i in d.b("images", "shop")}
    assert kinds == {"replica"}  # failover and syncback images are gone
    assert not dr_path.exists()  # the DR copy was withdrawn from its host

    # mirroring resumes incrementally
    (prod / "orders" / "102.json").write_text('{"order": 102, "site": "prod"}\n')
    snap = d.a("capture", "shop")["image"]
    wait_for(lambda: any(i["id"] == snap["id"] for i in d.b("images", "shop")), 60, "replica")
    job = next(j for j in d.a("jobs", "--app", "shop") if j["type"] == "replicate")
    assert job["status"] == "succeeded" and job["bytes_sent"] < MiB  # not the 3 MiB again


def test_volume_syncback_moves_only_what_was_written(drill: Drill, tmp_path: Path) -> None:
    d = drill
    nbdcopy = shutil.which("nbdcopy")
    assert nbdcopy, "apt-get install libnbd-bin"
    volume = tmp_path / "vm.img"
    volume.write_bytes(os.urandom(16 * MiB))
    protect_and_replicate(d, "vm", "volume", volume)
    copy = d.b.run(
        "failover",
        "vm",
        "--host",
        "host2",
        "--confirm",
        "FAILOVER",
        "--mount-point",
        str(tmp_path / "vm-copy"),
        check=False,
    )  # a file copy would take writes that syncback never sees: refused
    assert copy.code == 2 and "NBD only" in copy.error  # invalid input: exit 2
    over = d.b("failover", "vm", "--host", "host2", "--confirm", "FAILOVER")
    uri = over["nbd_uri"]

    # the VM writes 1 MiB at the DR site through NBD
    local = tmp_path / "local.img"
    shutil.copyfile(volume, local)
    with open(local, "r+b") as fh:
        fh.seek(5 * MiB)
        fh.write(os.urandom(MiB))
    import subprocess

    subprocess.run([nbdcopy, str(local), uri], check=True)
    sync = d.b("syncback", "vm")
    assert sync["job"]["status"] == "succeeded", sync["job"]
    assert sync["job"]["bytes_sent"] < 2 * MiB  # the written MiB, not the 16 MiB volume
    # ...sent while the capture stored it, not after it
    log = " | ".join(line["text"] for line in d.b("job", "log", sync["job"]["id"]))
    meanwhile = re.search(r"(\d+) bytes sent meanwhile", log)
    assert meanwhile is not None and int(meanwhile.group(1)) >= MiB, log

    d.a("restore", "vm", "--image", sync["image"]["id"], *CONFIRM)
    assert digest(volume) == digest(local)
    assert d.b("failback", "vm")["job"]["status"] == "succeeded"


def test_clone_is_an_independent_copy_that_never_overwrites(drill: Drill, tmp_path: Path) -> None:
    d = drill
    data = tmp_path / "cms"
    (data / "pages").mkdir(parents=True)
    (data / "pages" / "home.md").write_text("# welcome\n")
    hooks = ("--stop", "cms-stop", "--start", "cms-start")
    d.a("app", "add", "cms", "--host", "host1", "--kind", "filesystem", "--path", str(data), *hooks)
    d.a("template", "add", "cms-plain")
    d.a("app", "protect", "cms", "--template", "cms-plain")
    snap = d.a("capture", "cms")["image"]

    target = tmp_path / "cms-copy"
    done = d.a("clone", snap["id"], "--host", "host1", "--path", str(target), "--name", "cms2")
    assert done["job"]["status"] == "succeeded", done["job"]
    assert tree_digests(target) == tree_digests(data)
    clone_app = next(a for a in d.a("apps") if a["name"] == "cms2")
    assert clone_app["path"] == str(target) and clone_app["state"] == "unmanaged"
    # hooks run as root: an operator's clone does not carry them, an admin registers them
    assert (clone_app["start"], clone_app["stop"]) == (None, None)

    (target / "pages" / "home.md").write_text("# edited copy\n")
    again = d.a.run(
        "clone", snap["id"], "--host", "host1", "--path", str(target), "--name", "cms3", check=False
    )
    # cms2 holds that path now: refused before any data moves (two apps never overlap)
    assert again.code == 1 and "is the path of application 'cms2'" in again.error
    assert (target / "pages" / "home.md").read_text() == "# edited copy\n"
    assert (data / "pages" / "home.md").read_text() == "# welcome\n"
