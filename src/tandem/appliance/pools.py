"""Where an appliance's chunk pool lives: DIR/pool (default), another directory, or an
S3-compatible object store (``--pool s3://BUCKET[/PREFIX]?endpoint=URL``).

config.json's ``extra.pool`` holds the directory or the store's URL; the store's
credentials (taken from TANDEM_S3_ACCESS_KEY and TANDEM_S3_SECRET_KEY at ``init``) are kept
apart in DIR/s3.json (mode 0600, like the TLS key), so that config.json names no secret. A
pool on a store keeps the copies of its pack indexes in DIR/pool-cache, a sibling of where
a local pool would be (the overlays and WAL folders stay under DIR either way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tandem.errors import StoreCredentialsMissing, StoreCredentialsUnreadable
from tandem.storage.fileio import write_durably
from tandem.storage.objstore import (
    ACCESS_KEY_ENV,
    SECRET_KEY_ENV,
    ObjectStore,
    StoreUrl,
    credentials_from_env,
    is_store_url,
    parse_store_url,
)
from tandem.storage.pool import ChunkPool
from tandem.storage.s3pool import S3Pool
from tandem.transport.server import DaemonConfig

CREDENTIALS = "s3.json"
CACHE = "pool-cache"


def store_from_env(url: StoreUrl) -> ObjectStore:
    """The store of ``url`` with the credentials from the environment, checked: raises
    ObjectStoreDenied, BucketMissing or ObjectStoreUnreachable before anything is made."""
    access, secret = credentials_from_env()
    if not access or not secret:
        raise StoreCredentialsMissing(access=ACCESS_KEY_ENV, secret=SECRET_KEY_ENV)
    store = ObjectStore(url, access_key=access, secret_key=secret)
    store.check()
    return store


def save_credentials(directory: Path, store: ObjectStore, access: str, secret: str) -> None:
    doc = {"url": str(store.url), "access_key": access, "secret_key": secret}
    write_durably(directory / CREDENTIALS, json.dumps(doc).encode(), mode=0o600)


def load_store(directory: Path, url: StoreUrl) -> ObjectStore:
    """The store of an appliance made with ``--pool s3://…``, with its saved credentials."""
    path = directory / CREDENTIALS
    try:
        doc: Any = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise StoreCredentialsUnreadable(path=path, problem="is missing", url=url) from exc
    except ValueError as exc:
        raise StoreCredentialsUnreadable(path=path, problem="is not JSON", url=url) from exc
    if not isinstance(doc, dict) or not all(
        isinstance(doc.get(k), str) and doc.get(k) for k in ("access_key", "secret_key")
    ):
        raise StoreCredentialsUnreadable(
            path=path, problem="lacks access_key or secret_key", url=url
        )
    return ObjectStore(url, access_key=doc["access_key"], secret_key=doc["secret_key"])


def pool_location(directory: Path, cfg: DaemonConfig) -> str:
    """``extra.pool`` (a directory or a store URL; a joined process: the first one's), else
    DIR/pool."""
    pool = cfg.extra.get("pool")
    return str(pool) if pool else str(directory / "pool")


def open_pool(directory: Path, cfg: DaemonConfig, credentials_dir: Path | None = None) -> ChunkPool:
    """The appliance's pool, opened (a store's: reached and checked to hold a pool)."""
    where = pool_location(directory, cfg)
    if is_store_url(where):
        store = load_store(credentials_dir or directory, parse_store_url(where))
        return S3Pool(store, directory / CACHE)
    return ChunkPool(Path(where))


def create_pool(directory: Path, pool: str | None) -> tuple[dict[str, Any], ChunkPool]:
    """Make the pool of a new appliance in ``directory``; returns the config.json fields
    that name it and the pool. A store's credentials are checked before anything is made."""
    if pool is None:
        return {}, ChunkPool.create(directory / "pool")
    if is_store_url(pool):
        url = parse_store_url(pool)
        store = store_from_env(url)
        access, secret = credentials_from_env()
        made = S3Pool.create_on(store, directory / CACHE)
        save_credentials(directory, store, access, secret)
        return {"pool": str(url)}, made
    return {"pool": pool_field(pool)}, ChunkPool.create(Path(pool_field(pool)))


def pool_field(pool: str) -> str:
    """``extra.pool`` for a ``--pool`` value: the store's URL as parsed, or the absolute
    directory."""
    if is_store_url(pool):
        return str(parse_store_url(pool))
    return str(Path(pool).resolve())


def check_pool_arg(pool: str | None) -> None:
    """A clear error for a bad ``--pool`` before anything is made (a store is reached and
    its credentials checked, which ``create_pool`` repeats)."""
    if pool is not None and is_store_url(pool):
        store_from_env(parse_store_url(pool))
