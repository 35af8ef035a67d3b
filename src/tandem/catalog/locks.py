"""Locks that hold across every appliance process of one catalog.

Invariants
- On PostgreSQL a ``CatalogLock`` is a session-level advisory lock
  (``pg_try_advisory_lock``) taken on a connection of its own, kept open while the lock is
  held: a process that dies (or loses the database) loses the connection and so the lock,
  and another process can take it at once. No lease to expire, nothing to clean up.
- Its key is a stable 63-bit number derived from the database, the schema and the lock's
  name: the same in every process of one catalog, different for catalogs side by side.
- On SQLite only one appliance process may use the catalog (``appliance.daemon`` refuses a
  second), so the lock is a ``threading.Lock`` of the process, one per catalog and name.
- Taking is never blocking: the caller learns at once that another process holds it.
"""

from __future__ import annotations

import hashlib
import threading
from types import TracebackType

from sqlalchemy import Connection, text

from tandem.catalog.db import Catalog


def lock_key(name: str) -> int:
    """The advisory lock key of ``name``: a signed 64-bit number, stable across processes."""
    return int.from_bytes(hashlib.blake2b(f"tandem:{name}".encode(), digest_size=8).digest()) >> 1


_LOCAL: dict[tuple[str, str], threading.Lock] = {}
_LOCAL_GUARD = threading.Lock()


def _local_lock(url: str, name: str) -> threading.Lock:
    with _LOCAL_GUARD:
        return _LOCAL.setdefault((url, name), threading.Lock())


class CatalogLock:
    """A named lock shared by the processes of ``catalog``. Not reentrant; one holder per
    object, and each object is used by one thread at a time."""

    def __init__(self, catalog: Catalog, name: str) -> None:
        self.catalog = catalog
        self.name = name
        self.key = lock_key(name)
        self._scoped: int | None = None
        self._connection: Connection | None = None
        self._local = _local_lock(catalog.url, name) if catalog.dialect != "postgresql" else None
        self._held_local = False

    def try_acquire(self) -> bool:
        """Take the lock if no process holds it; whether this object holds it now."""
        if self._local is not None:
            if not self._held_local:
                self._held_local = self._local.acquire(blocking=False)
            return self._held_local
        if self._connection is not None:
            return self.held()
        connection = self.catalog.engine.connect()
        try:
            if self._scoped is None:
                # Advisory locks are per database: name the schema too, so appliances with
                # catalogs in different schemas of one database never share a lock.
                row = connection.execute(text("SELECT current_database(), current_schema()"))
                where = row.one()
                self._scoped = lock_key(f"{where[0]}/{where[1]}/{self.name}")
            self.key = self._scoped
            got = bool(
                connection.execute(
                    text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}
                ).scalar()
            )
            connection.commit()
        except BaseException:
            connection.close()
            raise
        if not got:
            connection.close()
            return False
        self._connection = connection
        return True

    def held(self) -> bool:
        """Whether this object still holds the lock (on PostgreSQL: its connection is alive;
        a connection that failed is dropped, and with it the lock)."""
        if self._local is not None:
            return self._held_local
        if self._connection is None:
            return False
        try:
            self._connection.execute(text("SELECT 1"))
            self._connection.commit()
        except Exception:
            self._drop()
            return False
        return True

    def release(self) -> None:
        """Give the lock back (a no-op when not held)."""
        if self._local is not None:
            if self._held_local:
                self._held_local = False
                self._local.release()
            return
        if self._connection is None:
            return
        try:
            self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            self._connection.commit()
        except Exception:
            pass  # closing the connection below releases it all the same
        self._drop()

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                connection.invalidate()

    def __enter__(self) -> bool:
        return self.try_acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
