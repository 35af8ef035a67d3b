"""The object-store client against a real S3 server (Swift with s3api, started by the
tests): whole objects, ranges, listing by prefix, deletes, and the errors an operator
sees for wrong credentials, an absent bucket and a store that is down."""

from __future__ import annotations

import os
import time

import pytest

from tandem.errors import (
    BucketMissing,
    ObjectMissing,
    ObjectStoreDenied,
    ObjectStoreUnreachable,
    PoolUrlInvalid,
)
from tandem.storage.objstore import ObjectStore, StoreUrl, parse_store_url
from tandem.transport.server import free_port
from tests.s3server import S3Server


def test_objects_round_trip_whole_and_by_range(s3_store: ObjectStore) -> None:
    data = os.urandom(300_000)
    s3_store.put("packs/a.pack", data)
    assert s3_store.get("packs/a.pack") == data
    assert s3_store.get_range("packs/a.pack", 1000, 5000) == data[1000:6000]
    assert s3_store.get_range("packs/a.pack", 299_990, 100) == data[299_990:]
    assert s3_store.exists("packs/a.pack")
    assert not s3_store.exists("packs/b.pack")
    with pytest.raises(ObjectMissing):
        s3_store.get("packs/b.pack")


def test_listing_pages_through_a_prefix_and_deletes_remove(s3_server: S3Server) -> None:
    url = StoreUrl(bucket="tandem-listing", prefix="p", endpoint=s3_server.endpoint)
    store = ObjectStore(url, access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    store.create_bucket()
    store.create_bucket()  # again: already ours, nothing happens
    keys = [f"manifests/{i:04d}" for i in range(25)]
    for key in keys:
        store.put(key, key.encode())
    store.put("pool.json", b"{}")
    listed = list(store.list("manifests/", page=10))  # three pages
    assert [o.key for o in listed] == keys
    assert all(o.size == len(o.key) and o.modified > time.time() - 600 for o in listed)
    assert store.delete_many([*keys[:21], "manifests/absent"], batch_size=10) == 22
    assert [o.key for o in store.list("manifests/")] == keys[21:]
    store.delete("pool.json")
    store.delete("pool.json")  # absent: nothing to do
    assert [o.key for o in store.list()] == keys[21:]


def test_wrong_credentials_are_named_as_such(s3_server: S3Server) -> None:
    url = StoreUrl(bucket="tandem-denied", prefix="", endpoint=s3_server.endpoint)
    store = ObjectStore(url, access_key=s3_server.access_key, secret_key="not-the-secret")
    with pytest.raises(ObjectStoreDenied) as caught:
        store.check()
    assert "credentials" in caught.value.message and "TANDEM_S3_SECRET_KEY" in caught.value.message
    nobody = ObjectStore(url, access_key="nobody:none", secret_key="x")
    with pytest.raises(ObjectStoreDenied):
        nobody.put("k", b"v")


def test_an_absent_bucket_is_named(s3_server: S3Server) -> None:
    url = StoreUrl(bucket="tandem-never-made", prefix="", endpoint=s3_server.endpoint)
    store = ObjectStore(url, access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    with pytest.raises(BucketMissing) as caught:
        store.get("pool.json")
    assert "tandem-never-made" in caught.value.message


def test_a_store_that_is_down_is_unreachable_after_the_retries() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    url = StoreUrl(bucket="tandem-down", prefix="", endpoint=endpoint)
    store = ObjectStore(url, access_key="a", secret_key="b", attempts=2, timeout=5)
    with pytest.raises(ObjectStoreUnreachable) as caught:
        store.put("k", b"v")
    assert endpoint in caught.value.message and "2 attempt" in caught.value.message


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("http://bucket?endpoint=http://h:1", "scheme"),
        ("s3://Bucket?endpoint=http://h:1", "lower case"),
        ("s3://b?endpoint=http://h:1", "3-63"),
        ("s3://bucket", "endpoint"),
        ("s3://bucket?endpoint=ftp://h", "http(s)"),
        ("s3://bucket?endpoint=http://h:99999", "port"),
        ("s3://bucket/a/../b?endpoint=http://h:1", "'..'"),
        ("s3://bucket?endpoint=http://h:1&acl=public", "unknown"),
    ],
)
def test_a_bad_pool_url_names_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(PoolUrlInvalid) as caught:
        parse_store_url(text)
    assert why in caught.value.message


def test_a_pool_url_parses_and_prints_back() -> None:
    url = parse_store_url("s3://tandem-dr/site-a/pool?endpoint=http://10.0.0.5:8080/&region=eu-1")
    assert url == StoreUrl(
        bucket="tandem-dr", prefix="site-a/pool", endpoint="http://10.0.0.5:8080", region="eu-1"
    )
    assert parse_store_url(str(url)) == url
