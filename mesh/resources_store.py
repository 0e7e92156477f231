"""The resource store: the whole resource set as one JetStream KV key, one revision per change.

Every write is a compare-and-swap on the revision that was read, so two concurrent
`mesh apply` runs cannot both win; the loser is told to retry. The bucket keeps up to 64
revisions: `mesh rollback` rewrites an old one as the newest.
"""

from __future__ import annotations

from dataclasses import dataclass

from bus import subjects
from bus.client import Bus
from bus.errors import KVConflict
from bus.kv import KV, open_kv
from mesh.errors import ConfigError
from mesh.resources import ResourceSet, decode_set, encode_set, validate_set

KV_HISTORY = 64


@dataclass(frozen=True)
class Revision:
    revision: int
    resources: ResourceSet
    note: str
    deleted: bool = False


class Store:
    def __init__(self, kv: KV) -> None:
        self.kv = kv

    @staticmethod
    async def open(bus: Bus) -> Store:
        return Store(await open_kv(bus, subjects.KV_CONFIG, history=KV_HISTORY))

    async def current(self) -> Revision:
        entry = await self.kv.get(subjects.CONFIG_KEY)
        if entry is None:
            return Revision(0, {}, "")
        resources, note = decode_set(entry.value)
        return Revision(entry.revision, resources, note)

    async def write(self, resources: ResourceSet, base: int, note: str) -> int:
        """Validate the whole set, then CAS it over revision `base` (0: nothing stored yet)."""
        validate_set(resources)
        data = encode_set(resources, note)
        try:
            if base == 0:
                return await self.kv.create(subjects.CONFIG_KEY, data)
            return await self.kv.update(subjects.CONFIG_KEY, data, base)
        except KVConflict:
            raise ConfigError(
                f"the configuration changed while this command ran (it read revision {base}); "
                "nothing was written: run it again"
            ) from None

    async def history(self) -> list[Revision]:
        out = []
        for e in await self.kv.history(subjects.CONFIG_KEY):
            if e.deleted or not e.value:
                out.append(Revision(e.revision, {}, "(deleted)", deleted=True))
                continue
            try:
                resources, note = decode_set(e.value)
            except ConfigError as exc:
                out.append(Revision(e.revision, {}, f"(unreadable: {exc})", deleted=True))
                continue
            out.append(Revision(e.revision, resources, note))
        return out
