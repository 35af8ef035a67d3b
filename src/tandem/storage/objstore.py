"""An S3-compatible object store: whole-object put, get, range get, list and delete.

A thin layer over boto3 (the S3 client every S3-compatible server is tested against) that
gives the pool what it needs and nothing more, and turns the client's failures into
tandem's errors at this boundary:

- Transient failures (5xx answers, throttling, connection errors, timeouts) are retried by
  botocore's "standard" retry mode: exponential backoff with jitter, ``attempts`` tries in
  all. What still fails is ``ObjectStoreUnreachable`` (no answer) or ``ObjectStoreFailed``
  (an answer that is an error).
- Wrong credentials are ``ObjectStoreDenied``, an absent bucket ``BucketMissing``, an absent
  object ``ObjectMissing`` (which the pool translates into a missing chunk).
- A put is one request: the object is visible whole or not at all (S3's semantics), which
  the pool relies on for its commit points (a pack's index object written after the pack).

Keys are given relative to the store's ``prefix`` (``s3://BUCKET/PREFIX``), so one bucket
can hold several pools.
"""

from __future__ import annotations

import base64
import hashlib
import os
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tandem.errors import (
    BucketMissing,
    ObjectMissing,
    ObjectStoreDenied,
    ObjectStoreFailed,
    ObjectStoreUnreachable,
    PoolUrlInvalid,
    StorageError,
)

DEFAULT_ATTEMPTS = 5
DEFAULT_TIMEOUT = 30.0  # seconds, per connection attempt and per read
DELETE_BATCH = 1000  # keys per DeleteObjects request (S3's limit)
ACCESS_KEY_ENV = "TANDEM_S3_ACCESS_KEY"
SECRET_KEY_ENV = "TANDEM_S3_SECRET_KEY"

_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "403",
    "401",
}
_MISSING_OBJECT = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class StoreUrl:
    """A parsed ``s3://BUCKET[/PREFIX]?endpoint=URL[&region=REGION]``."""

    bucket: str
    prefix: str
    endpoint: str
    region: str = "us-east-1"

    def __str__(self) -> str:
        path = f"/{self.prefix}" if self.prefix else ""
        return f"s3://{self.bucket}{path}?endpoint={self.endpoint}&region={self.region}"


def is_store_url(text: str) -> bool:
    return text.startswith("s3://")


def parse_store_url(text: str) -> StoreUrl:
    """Parse a pool URL; raises ``PoolUrlInvalid`` naming what is wrong."""

    def bad(reason: str) -> PoolUrlInvalid:
        return PoolUrlInvalid(url=text, reason=reason)

    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "s3":
        raise bad("the scheme must be s3://")
    bucket = parts.netloc
    if not (3 <= len(bucket) <= 63) or not all(c.isalnum() or c in "-." for c in bucket):
        raise bad("the bucket name must be 3-63 letters, digits, '-' or '.'")
    if bucket != bucket.lower() or bucket[0] in "-." or bucket[-1] in "-.":
        raise bad("the bucket name must be lower case and start and end with a letter or digit")
    prefix = parts.path.strip("/")
    if any(seg in ("", ".", "..") for seg in prefix.split("/")) and prefix:
        raise bad("the prefix must not hold empty, '.' or '..' segments")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = set(query) - {"endpoint", "region"}
    if unknown:
        raise bad(f"unknown parameter(s) {', '.join(sorted(unknown))}")
    endpoints = query.get("endpoint", [])
    if len(endpoints) != 1:
        raise bad("give the store's address once, as ?endpoint=http(s)://HOST:PORT")
    endpoint = endpoints[0].rstrip("/")
    ep = urllib.parse.urlsplit(endpoint)
    if ep.scheme not in ("http", "https") or not ep.hostname or ep.path or ep.query:
        raise bad("the endpoint must be http(s)://HOST[:PORT]")
    try:
        ep.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise bad("the endpoint's port is not a number in 1-65535") from exc
    regions = query.get("region", ["us-east-1"])
    if len(regions) != 1 or not regions[0]:
        raise bad("give the region once, e.g. region=us-east-1")
    return StoreUrl(bucket=bucket, prefix=prefix, endpoint=endpoint, region=regions[0])


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's prefix
    size: int
    modified: float  # seconds since the epoch, as the store reports it


def credentials_from_env() -> tuple[str, str]:
    """The access key and secret from TANDEM_S3_ACCESS_KEY and TANDEM_S3_SECRET_KEY."""
    access = os.environ.get(ACCESS_KEY_ENV, "")
    secret = os.environ.get(SECRET_KEY_ENV, "")
    return access, secret


def _add_content_md5(params: dict[str, Any], **_: Any) -> None:
    body = params.get("body") or b""
    if isinstance(body, str):
        body = body.encode()
    digest = hashlib.md5(body, usedforsecurity=False).digest()
    params["headers"]["Content-MD5"] = base64.b64encode(digest).decode()


class ObjectStore:
    """One bucket (and prefix) of an S3-compatible store. Thread-safe (boto3 clients are)."""

    def __init__(
        self,
        url: StoreUrl,
        *,
        access_key: str,
        secret_key: str,
        attempts: int = DEFAULT_ATTEMPTS,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.url = url
        self.bucket = url.bucket
        self.endpoint = url.endpoint
        self.attempts = attempts
        self._prefix = f"{url.prefix}/" if url.prefix else ""
        self.requests: dict[str, int] = {}  # operation -> requests made (retries not counted)
        config = Config(
            region_name=url.region,
            retries={"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=timeout,
            read_timeout=timeout,
            s3={"addressing_style": "path"},
            max_pool_connections=32,
            # Swift and older stores do not speak the newer checksum trailers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=url.endpoint,
            aws_access_key_id=access_key or "-",
            aws_secret_access_key=secret_key or "-",
            config=config,
        )
        # Swift's s3api (and other older stores) want Content-MD5 on a multi-delete, which
        # botocore no longer sends by itself.
        self._client.meta.events.register("before-call.s3.DeleteObjects", _add_content_md5)

    # --- errors -------------------------------------------------------------------------

    def _translate(self, exc: Exception, operation: str, key: str) -> StorageError:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            reason = f"{code or status}: {error.get('Message') or 'no message'}"
            tries = 1 + int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0))
            if code in _DENIED or status in (401, 403):
                return ObjectStoreDenied(endpoint=self.endpoint, bucket=self.bucket, reason=reason)
            if code == "NoSuchBucket":
                return BucketMissing(bucket=self.bucket, endpoint=self.endpoint)
            if code in _MISSING_OBJECT or status == 404:
                return ObjectMissing(key=key, bucket=self.bucket, endpoint=self.endpoint)
            return ObjectStoreFailed(
                endpoint=self.endpoint,
                operation=operation,
                key=key,
                reason=reason,
                attempts=tries,
            )
        if isinstance(
            exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError | ConnectionError
        ):
            return ObjectStoreUnreachable(
                endpoint=self.endpoint, reason=str(exc), attempts=self.attempts
            )
        if isinstance(exc, BotoCoreError):
            return ObjectStoreFailed(
                endpoint=self.endpoint,
                operation=operation,
                key=key,
                reason=str(exc),
                attempts=self.attempts,
            )
        raise exc

    def _call(self, operation: str, key: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        method = getattr(self._client, operation)
        self.requests[operation] = self.requests.get(operation, 0) + 1
        try:
            return method(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, operation, key) from exc

    # --- the bucket ---------------------------------------------------------------------

    def check(self) -> None:
        """Raise unless the bucket exists and the credentials may use it."""
        try:
            self._call("head_bucket", "", Bucket=self.bucket)
        except ObjectMissing as exc:  # a HEAD's 404 has no body to name the bucket
            raise BucketMissing(bucket=self.bucket, endpoint=self.endpoint) from exc

    def create_bucket(self) -> None:
        """Create the bucket; nothing if this account already owns it."""
        try:
            self._call("create_bucket", "", Bucket=self.bucket)
        except ObjectStoreFailed as exc:
            if "BucketAlready" not in exc.fields.get("reason", ""):
                raise
            self.check()

    # --- objects ------------------------------------------------------------------------

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` as ``key`` in one request (visible whole or not at all)."""
        self._call("put_object", key, Bucket=self.bucket, Key=self._prefix + key, Body=bytes(data))

    def get(self, key: str) -> bytes:
        reply = self._call("get_object", key, Bucket=self.bucket, Key=self._prefix + key)
        return self._read_body(reply, key, "get_object")

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``key`` from ``offset`` (fewer at the object's end)."""
        if length <= 0:
            return b""
        reply = self._call(
            "get_object",
            key,
            Bucket=self.bucket,
            Key=self._prefix + key,
            Range=f"bytes={offset}-{offset + length - 1}",
        )
        return self._read_body(reply, key, "get_object")

    def _read_body(self, reply: Any, key: str, operation: str) -> bytes:
        from botocore.exceptions import BotoCoreError

        try:
            return bytes(reply["Body"].read())
        except (BotoCoreError, OSError) as exc:
            # the answer broke off mid-body: the store is (for now) unreachable
            raise ObjectStoreUnreachable(
                endpoint=self.endpoint, reason=f"{operation} {key}: {exc}", attempts=1
            ) from exc

    def exists(self, key: str) -> bool:
        try:
            self._call("head_object", key, Bucket=self.bucket, Key=self._prefix + key)
        except ObjectMissing:
            return False
        return True

    def list(self, prefix: str = "", *, page: int = 1000) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order, ``page`` keys a
        request."""
        token: str | None = None
        cut = len(self._prefix)
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": self._prefix + prefix,
                "MaxKeys": page,
            }
            if token:
                kwargs["ContinuationToken"] = token
            reply = self._call("list_objects_v2", prefix, **kwargs)
            for item in reply.get("Contents", []):
                modified: datetime = item["LastModified"]
                yield ObjectInfo(
                    key=str(item["Key"])[cut:],
                    size=int(item["Size"]),
                    modified=modified.timestamp(),
                )
            if not reply.get("IsTruncated"):
                return
            token = reply.get("NextContinuationToken")
            if not token:
                return

    def delete(self, key: str) -> None:
        """Remove ``key``; nothing if it is absent (S3 answers a delete of nothing alike)."""
        try:
            self._call("delete_object", key, Bucket=self.bucket, Key=self._prefix + key)
        except ObjectMissing:
            return

    def delete_many(self, keys: Iterable[str], *, batch_size: int = DELETE_BATCH) -> int:
        """Remove ``keys``, ``batch_size`` a request; returns how many were asked."""
        todo = list(keys)
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            reply = self._call(
                "delete_objects",
                batch[0],
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._prefix + k} for k in batch], "Quiet": True},
            )
            failed = [e for e in reply.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if failed:
                first = failed[0]
                raise ObjectStoreFailed(
                    endpoint=self.endpoint,
                    operation="delete_objects",
                    key=str(first.get("Key", "")),
                    reason=f"{first.get('Code')}: {first.get('Message')}",
                    attempts=self.attempts,
                )
        return len(todo)
