"""JetStream key-value buckets behind trio calls.

Values are bytes; callers encode them (usually with mesh.messages). Conflicts
are the normal outcome of optimistic concurrency, so they get their own error
type (`KVConflict`) that callers catch and retry.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import trio
from nats.js.api import KeyValueConfig, StorageType
from trio_asyncio import aio_as_trio

from bus.client import Bus
from bus.errors import BusTimeout, KVConflict, KVError
from mesh.errors import BusError

log = logging.getLogger("mesh.bus.kv")


@dataclass(frozen=True, slots=True)
class KVEntry:
    key: str
    value: bytes
    revision: int
    deleted: bool = False


class WatchMarker(enum.Enum):
    """Yielded once by a watch when every value present at its start was seen."""

    INITIAL_DONE = "initial-done"


INITIAL_DONE = WatchMarker.INITIAL_DONE


def _entry(e: Any) -> KVEntry:
    deleted = e.operation in ("DEL", "PURGE")
    return KVEntry(e.key, e.value or b"", int(e.revision or 0), deleted)


class KV:
    """One bucket. Obtain with `await open_kv(bus, name, ...)`."""

    def __init__(self, bus: Bus, name: str, handle: Any) -> None:
        self.bus = bus
        self.name = name
        self._kv = handle

    def _translate(self, what: str, exc: Exception, key: str = "") -> BusError:
        """Every NATS failure comes out as a BusError: callers retry those, so none may
        escape raw (NoStreamResponseError, during a stream leader election, is not an
        APIError, for one)."""
        if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError):
            return KVConflict(
                f"{self.name}/{key}: {what} lost a race (the key changed since it was read)"
            )
        if isinstance(exc, nats.errors.TimeoutError):
            if self.bus.was_denied("publish", "$JS.API.") or self.bus.was_denied("publish", "$KV."):
                return self.bus.permission_error(f"{what} in key-value bucket {self.name}")
            return BusTimeout(f"key-value {what} in bucket {self.name} timed out")
        return KVError(
            f"key-value {what} in bucket {self.name} failed: {type(exc).__name__}: {exc}"
        )

    async def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await aio_as_trio(fn)(*args, **kwargs)
        except nats.errors.Error as exc:
            raise self._translate(what, exc, str(args[0]) if args else "") from None

    async def get(self, key: str) -> KVEntry | None:
        try:
            e = await aio_as_trio(self._kv.get)(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except nats.errors.Error as exc:
            raise self._translate("get", exc, key) from None
        return _entry(e)

    async def put(self, key: str, value: bytes) -> int:
        return int(await self._call("put", self._kv.put, key, value))

    async def create(self, key: str, value: bytes) -> int:
        """Write only if the key is absent (or deleted); KVConflict otherwise."""
        try:
            return int(await self._call("create", self._kv.create, key, value))
        except KVConflict:
            raise KVConflict(f"{self.name}/{key} already exists") from None

    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Compare-and-swap: write only if the key is still at `revision`."""
        try:
            return int(await self._call("update", self._kv.update, key, value, last=revision))
        except KVConflict:
            raise KVConflict(
                f"{self.name}/{key} is no longer at revision {revision}: someone else changed it"
            ) from None

    async def delete(self, key: str, revision: int | None = None) -> None:
        await self._call("delete", self._kv.delete, key, last=revision)

    async def keys(self) -> list[str]:
        try:
            return list(await aio_as_trio(self._kv.keys)())
        except nats.js.errors.NoKeysError:
            return []
        except nats.errors.Error as exc:
            raise self._translate("keys", exc) from None

    async def history(self, key: str) -> list[KVEntry]:
        # nats-py's history ends at the watcher's "nothing pending" marker, which it can
        # put first when the history was delivered before it asked the consumer how much
        # was pending (seen under load: `mesh rollback --list` printed nothing). An empty
        # answer for a key that has a value is that race: ask again.
        for _ in range(3):
            try:
                return [_entry(e) for e in await aio_as_trio(self._kv.history)(key)]
            except nats.js.errors.NoKeysError:
                if await self.get(key) is None:
                    return []
            except nats.errors.Error as exc:
                raise self._translate("history", exc, key) from None
        raise KVError(f"key-value bucket {self.name}: no history of {key!r} (asked 3 times)")

    @asynccontextmanager
    async def watch(
        self, keys: str = ">", *, include_deletes: bool = True
    ) -> AsyncIterator[KVWatch]:
        watcher = await self._call(
            "watch", self._kv.watch, keys, ignore_deletes=not include_deletes
        )
        try:
            yield KVWatch(watcher)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await aio_as_trio(watcher.stop)()
                except nats.errors.Error as exc:
                    log.debug("stopping watch on %s: %s", self.name, exc)


class KVWatch:
    """Async iterator: every current value, then INITIAL_DONE once, then live updates."""

    def __init__(self, watcher: Any) -> None:
        self._watcher = watcher
        self._initial_done = False

    def __aiter__(self) -> KVWatch:
        return self

    async def __anext__(self) -> KVEntry | WatchMarker:
        # One crossing per update: watches carry config changes, not hot traffic.
        entry = await aio_as_trio(self._watcher.__anext__)()
        if entry is None:
            if self._initial_done:
                return await self.__anext__()
            self._initial_done = True
            return INITIAL_DONE
        return _entry(entry)


async def open_kv(
    bus: Bus,
    name: str,
    *,
    replicas: int = 1,
    history: int = 1,
    ttl: float | None = None,
    create: bool = True,
    direct: bool = False,
) -> KV:
    """Bind to a bucket, creating it with this config if it does not exist.

    ``direct``: gets are served as ``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>``, with
    the key in the subject, so NATS permissions can allow reading one key and nothing else
    (bus/auth.py: sidecars read only ``mesh_ca/bundle``). A bucket made before without it is
    switched to direct gets (a stream config update; the data stays)."""
    js = bus.jetstream
    try:
        handle = await aio_as_trio(js.key_value)(name)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            raise KVError(f"key-value bucket {name} does not exist") from None
        config = KeyValueConfig(
            bucket=name,
            history=history,
            ttl=ttl,
            replicas=replicas,
            storage=StorageType.FILE,
            direct=direct or None,
        )
        try:
            handle = await aio_as_trio(js.create_key_value)(config)
        except nats.js.errors.APIError as exc:
            raise KVError(f"cannot create key-value bucket {name}: {exc}") from None
    except nats.errors.TimeoutError:
        if bus.was_denied("publish", "$JS.API."):
            raise bus.permission_error(f"use key-value bucket {name} (JetStream)") from None
        raise BusTimeout(
            f"JetStream did not answer binding bucket {name}; is JetStream enabled?"
        ) from None
    if direct and not getattr(handle, "_direct", True):
        handle = await _enable_direct(bus, name, handle)
    return KV(bus, name, handle)


async def _enable_direct(bus: Bus, name: str, handle: Any) -> Any:
    """Turn on allow_direct for a bucket created before it was asked for; on failure keep
    the handle as it is (gets still work for this user, only key-scoped permissions do not)."""
    js = bus.jetstream
    try:
        info = await aio_as_trio(js.stream_info)(f"KV_{name}")
        info.config.allow_direct = True
        await aio_as_trio(js.update_stream)(info.config)
        handle = await aio_as_trio(js.key_value)(name)
    except nats.errors.Error as exc:
        log.warning("bucket %s: could not enable direct gets: %s", name, exc)
        return handle
    log.info("bucket %s: direct gets enabled (sidecars may read one key of it)", name)
    return handle
