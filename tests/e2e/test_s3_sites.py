"""Two sites, one pool on an S3 store (Swift with s3api, started by the tests) and the other
a local directory, both ways round: the agent's captures land in the bucket, mirroring
replicates between the two pools unchanged, and the replicas restore byte for byte."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tandem.drill.lab import child_env, tandem_argv
from tandem.storage.objstore import ACCESS_KEY_ENV, SECRET_KEY_ENV, ObjectStore, StoreUrl
from tests.e2e.conftest import Daemon, appliance_cli, free_port, register_host, wait_for
from tests.s3server import S3Server

MiB = 1024 * 1024


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def s3_appliance(root: Path, name: str, server: S3Server, store: ObjectStore) -> Daemon:
    """An appliance made with ``--pool s3://…`` (its credentials in the environment of
    ``init`` only, as an operator gives them)."""
    url = f"s3://{store.bucket}/{name}?endpoint={store.endpoint}"
    made = Daemon("appliance", name, root / name, free_port(), init_args=("--pool", url))
    env = child_env() | {ACCESS_KEY_ENV: server.access_key, SECRET_KEY_ENV: server.secret_key}
    proc = subprocess.run(
        made.init_argv(), env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=120
    )
    made.created(proc.returncode, proc.stdout, proc.stderr)
    return made


def test_an_s3_site_mirrors_to_a_local_site(
    s3_server: S3Server, s3_store: ObjectStore, tmp_path: Path
) -> None:
    prod = s3_appliance(tmp_path, "prod", s3_server, s3_store)
    dr = Daemon.create("appliance", tmp_path / "dr", "dr")
    agent = Daemon.create("agent", tmp_path / "agent", "host1")
    daemons = [prod, dr, agent]
    try:
        for d in daemons:
            d.start()
        a, b = appliance_cli(prod), appliance_cli(dr)
        register_host(a, agent)
        a("peer", "add", "--url", dr.url, "--token", dr.token, "--fingerprint", dr.fingerprint)
        a("template", "add", "mirrored", "--mirror", "--keep", "5")
        volume = tmp_path / "disk.img"
        volume.write_bytes(os.urandom(12 * MiB))
        a("app", "add", "vm1", "--host", "host1", "--kind", "volume", "--path", str(volume))
        a("app", "protect", "vm1", "--template", "mirrored")
        copies = []
        for round_ in range(2):
            snap = a("capture", "vm1")["image"]
            copy = tmp_path / f"copy{round_}.img"
            copy.write_bytes(volume.read_bytes())
            copies.append((snap["id"], copy))
            with open(volume, "r+b") as fh:
                fh.seek(5 * MiB)
                fh.write(os.urandom(100_000))
        bucket = ObjectStore(
            StoreUrl(bucket=s3_store.bucket, prefix="prod", endpoint=s3_store.endpoint),
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
        )
        keys = [o.key for o in bucket.list()]  # the captures are in the bucket
        assert sum(k.startswith("manifests/") for k in keys) == 2
        assert any(k.endswith(".pack") for k in keys) and not (prod.directory / "pool").exists()
        wait_for(lambda: len(b("images", "vm1")) == 2, 120, "two replicas at DR")
        replicas = {r["id"]: r for r in b("images", "vm1")}
        for snap_id, copy in copies:
            assert a("image", "verify", snap_id)["ok"]
            assert b("image", "verify", snap_id)["ok"]
            out = tmp_path / f"restored-{snap_id}.img"
            subprocess.run(
                [
                    *tandem_argv(),
                    "storage",
                    "restore",
                    str(dr.directory / "pool"),
                    replicas[snap_id]["manifest"],
                    str(out),
                ],
                env=child_env(),
                check=True,
                capture_output=True,
                timeout=120,
            )
            assert digest(out) == digest(copy)
    finally:
        for d in reversed(daemons):
            d.stop()


def test_a_local_site_mirrors_to_an_s3_site(
    s3_server: S3Server, s3_store: ObjectStore, tmp_path: Path
) -> None:
    from tandem.appliance.pools import open_pool
    from tandem.storage.manifest import VolumeManifest, load_manifest
    from tandem.storage.volume import restore_volume
    from tandem.transport.server import load_daemon_dir

    prod = Daemon.create("appliance", tmp_path / "prod", "prod")
    dr = s3_appliance(tmp_path, "dr", s3_server, s3_store)
    agent = Daemon.create("agent", tmp_path / "agent", "host1")
    daemons = [prod, dr, agent]
    try:
        for d in daemons:
            d.start()
        a, b = appliance_cli(prod), appliance_cli(dr)
        register_host(a, agent)
        a("peer", "add", "--url", dr.url, "--token", dr.token, "--fingerprint", dr.fingerprint)
        a("template", "add", "mirrored", "--mirror", "--keep", "5")
        volume = tmp_path / "disk.img"
        volume.write_bytes(os.urandom(12 * MiB))
        a("app", "add", "vm1", "--host", "host1", "--kind", "volume", "--path", str(volume))
        a("app", "protect", "vm1", "--template", "mirrored")
        copies = []
        for round_ in range(2):
            snap = a("capture", "vm1")["image"]
            copy = tmp_path / f"copy{round_}.img"
            copy.write_bytes(volume.read_bytes())
            copies.append((snap["id"], copy))
            with open(volume, "r+b") as fh:
                fh.seek(7 * MiB)
                fh.write(os.urandom(100_000))
        wait_for(lambda: len(b("images", "vm1")) == 2, 120, "two replicas at DR")
        replicas = {r["id"]: r for r in b("images", "vm1")}
        pool = open_pool(dr.directory, load_daemon_dir(dr.directory, "appliance"))
        for snap_id, copy in copies:
            assert b("image", "verify", snap_id)["ok"]
            manifest = load_manifest(pool, bytes.fromhex(replicas[snap_id]["manifest"]))
            assert isinstance(manifest, VolumeManifest)
            out = tmp_path / f"restored-{snap_id}.img"
            restore_volume(pool, manifest, out)
            assert digest(out) == digest(copy)
    finally:
        for d in reversed(daemons):
            d.stop()
