"""``tandem appliance init DIR --pool s3://BUCKET?endpoint=…``: an appliance whose chunk
pool is on an S3-compatible store (Swift with s3api, started by the tests)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tandem.appliance.daemon import Appliance, init
from tandem.drill.lab import child_env, tandem_argv
from tandem.errors import BucketMissing, InvalidInput, ObjectStoreDenied
from tandem.storage.manifest import TreeManifest, load_manifest
from tandem.storage.objstore import ACCESS_KEY_ENV, SECRET_KEY_ENV, ObjectInfo, ObjectStore
from tandem.storage.s3pool import S3Pool
from tandem.storage.tree import restore_tree
from tests.appliance.conftest import seed_app, seed_image
from tests.appliance.live import free_port
from tests.s3server import S3Server
from tests.storage.test_s3gc import settled
from tests.storage.test_tree import listing, make_sample


def listen() -> str:
    return f"127.0.0.1:{free_port()}"


def pool_url(store: ObjectStore, prefix: str = "site-a") -> str:
    return f"s3://{store.bucket}/{prefix}?endpoint={store.endpoint}"


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    monkeypatch.setenv(ACCESS_KEY_ENV, s3_server.access_key)
    monkeypatch.setenv(SECRET_KEY_ENV, s3_server.secret_key)
    return s3_server


def test_an_appliance_keeps_its_images_in_the_bucket(
    s3_env: S3Server, s3_store: ObjectStore, tmp_path: Path
) -> None:
    directory = tmp_path / "dr"
    init(directory, "dr", listen(), None, pool=pool_url(s3_store))
    config = json.loads((directory / "config.json").read_text())
    assert config["extra"]["pool"].startswith(f"s3://{s3_store.bucket}/site-a?endpoint=")
    assert s3_env.secret_key not in (directory / "config.json").read_text()
    assert stat.S_IMODE(os.stat(directory / "s3.json").st_mode) == 0o600
    assert not (directory / "pool").exists()

    src, out = tmp_path / "src", tmp_path / "out"
    make_sample(src)
    appliance = Appliance(directory)
    try:
        pool = appliance.site.pool
        assert isinstance(pool, S3Pool)
        seed_app(appliance, "web")
        image = seed_image(appliance, "web", src)
        with appliance.catalog.read() as session:
            from tandem.catalog import queries as q

            mid = bytes.fromhex(q.get_image(session, image_id=image).manifest)
    finally:
        appliance.stop()
    assert any(o.key.startswith("site-a/manifests/") for o in _listing(s3_store))

    # The appliance opened again (its cache gone): the image is read from the bucket.
    for cached in (directory / "pool-cache" / "idx").iterdir():
        cached.unlink()
    again = Appliance(directory)
    try:
        manifest = load_manifest(again.site.pool, mid)
        assert isinstance(manifest, TreeManifest)
        restore_tree(again.site.pool, manifest, out)
    finally:
        again.stop()
    assert listing(out) == listing(src)


def _listing(store: ObjectStore) -> list[ObjectInfo]:
    """Every object of the bucket, whatever the store's own prefix."""
    root = ObjectStore(
        type(store.url)(bucket=store.bucket, prefix="", endpoint=store.endpoint),
        access_key=os.environ[ACCESS_KEY_ENV],
        secret_key=os.environ[SECRET_KEY_ENV],
    )
    return list(root.list())


def test_init_refuses_wrong_credentials_an_absent_bucket_and_none(
    s3_env: S3Server, s3_store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = pool_url(s3_store)
    monkeypatch.setenv(SECRET_KEY_ENV, "wrong")
    with pytest.raises(ObjectStoreDenied, match="refused the credentials"):
        init(tmp_path / "a", "dr", listen(), None, pool=url)
    assert not (tmp_path / "a" / "config.json").exists()
    monkeypatch.setenv(SECRET_KEY_ENV, s3_env.secret_key)
    with pytest.raises(BucketMissing, match="tandem-no-such-bucket"):
        init(
            tmp_path / "b",
            "dr",
            listen(),
            None,
            pool=url.replace(s3_store.bucket, "tandem-no-such-bucket"),
        )
    monkeypatch.delenv(ACCESS_KEY_ENV)
    with pytest.raises(InvalidInput, match=ACCESS_KEY_ENV):
        init(tmp_path / "c", "dr", listen(), None, pool=url)
    for name in "abc":
        assert not (tmp_path / name / "config.json").exists()


def test_the_cli_says_what_is_wrong_without_a_traceback(
    s3_env: S3Server, s3_store: ObjectStore, tmp_path: Path
) -> None:
    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            tandem_argv("appliance", "init", str(tmp_path / "dr"), "--name", "dr", *args),
            env=child_env() | env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    creds = {ACCESS_KEY_ENV: s3_env.access_key, SECRET_KEY_ENV: "wrong"}
    done = run("--pool", pool_url(s3_store), "--listen", listen(), **creds)
    assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout
    assert "refused the credentials" in done.stderr + done.stdout
    done = run("--pool", "s3://Bad_Bucket?endpoint=http://x:1", "--listen", listen(), **creds)
    assert done.returncode == 2 and "Invalid pool URL" in done.stderr + done.stdout
    creds[SECRET_KEY_ENV] = s3_env.secret_key
    done = run("--pool", pool_url(s3_store), "--listen", listen(), "--json", **creds)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == "dr"


def test_a_joined_process_shares_the_bucket(
    s3_env: S3Server, s3_store: ObjectStore, catalog_url: str, tmp_path: Path
) -> None:
    from tandem.appliance.daemon import join

    if not catalog_url.startswith("postgresql"):
        pytest.skip("several processes need a PostgreSQL catalog")
    init(tmp_path / "one", "prod", listen(), catalog_url, pool=pool_url(s3_store))
    join(tmp_path / "two", tmp_path / "one", listen())
    assert stat.S_IMODE(os.stat(tmp_path / "two" / "s3.json").st_mode) == 0o600
    src, out = tmp_path / "src", tmp_path / "out"
    make_sample(src)
    one, two = Appliance(tmp_path / "one"), Appliance(tmp_path / "two")
    try:
        assert isinstance(two.site.pool, S3Pool)
        assert two.site.pool.store.url == one.site.pool.store.url  # type: ignore[attr-defined]
        seed_app(one, "web")
        image = seed_image(one, "web", src)  # written through the first process
        with two.catalog.read() as session:
            from tandem.catalog import queries as q

            mid = bytes.fromhex(q.get_image(session, image_id=image).manifest)
        manifest = load_manifest(two.site.pool, mid)  # read through the second
        assert isinstance(manifest, TreeManifest)
        restore_tree(two.site.pool, manifest, out)
    finally:
        one.stop()
        two.stop()
    assert listing(out) == listing(src)


def _images_one_deleted(
    appliance: Appliance, tmp_path: Path, count: int, size: int
) -> tuple[S3Pool, list[str]]:
    """``count`` images of an app ``web`` on the appliance's bucket, the first then deleted
    from the catalog, every object old enough for a collection to take (the pool's clock
    slack cut to one second: one server, one clock)."""
    from tandem.catalog import queries as q

    pool = appliance.site.pool
    assert isinstance(pool, S3Pool)
    pool.clock_slack = 1.0
    seed_app(appliance, "web")
    made = []
    for i in range(count):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "data").write_bytes(os.urandom(size))
        made.append(seed_image(appliance, "web", src))
    with appliance.catalog.begin() as session:
        q.delete_image(session, image_id=made[0])
    settled(pool)
    return pool, made


def test_the_gc_job_collects_a_deleted_image_from_the_bucket(
    s3_env: S3Server, s3_store: ObjectStore, tmp_path: Path
) -> None:
    from tandem.domain.jobs import JobStatus
    from tandem.operations import gc, images

    directory = tmp_path / "dr"
    init(directory, "dr", listen(), None, pool=pool_url(s3_store))
    appliance = Appliance(directory)
    try:
        _, made = _images_one_deleted(appliance, tmp_path, 2, 400_000)
        appliance.runner.start()
        done = appliance.runner.wait(gc.submit_gc(appliance.site, actor="t").id, timeout=60)
        assert done.status is JobStatus.SUCCEEDED, done.message
        assert done.result is not None
        assert done.result["packs_deleted"] == 1 and done.result["bytes_freed"] > 400_000
        assert done.result["manifests_removed"] == 1
        assert "1 pack(s) deleted" in done.message
        assert images.verify_image(appliance.site, image_id=made[1])["ok"]
    finally:
        appliance.stop()


def test_a_gc_job_the_store_fails_mid_sweep_fails_cleanly_and_the_next_finishes(
    s3_env: S3Server, s3_store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tandem.domain.jobs import JobStatus
    from tandem.operations import gc, images

    directory = tmp_path / "dr"
    init(directory, "dr", listen(), None, pool=pool_url(s3_store))
    appliance = Appliance(directory)
    try:
        pool, made = _images_one_deleted(appliance, tmp_path, 3, 300_000)
        real = pool.sweep_packs

        def store_down(*args: Any, **kwargs: Any) -> Any:
            with s3_env.paused("object"):  # every object request answered 503
                return real(*args, **kwargs)

        monkeypatch.setattr(pool, "sweep_packs", store_down)
        appliance.runner.start()
        failed = appliance.runner.wait(gc.submit_gc(appliance.site, actor="t").id, timeout=120)
        assert failed.status is JobStatus.FAILED
        assert "failed" in failed.message and "attempt(s)" in failed.message
        for image in made[1:]:
            assert images.verify_image(appliance.site, image_id=image)["ok"]

        monkeypatch.setattr(pool, "sweep_packs", real)  # the store back
        done = appliance.runner.wait(gc.submit_gc(appliance.site, actor="t").id, timeout=60)
        assert done.status is JobStatus.SUCCEEDED, done.message
        assert done.result is not None and done.result["resumed"] is True
        assert done.result["packs_deleted"] == 1
        for image in made[1:]:
            assert images.verify_image(appliance.site, image_id=image)["ok"]
    finally:
        appliance.stop()
