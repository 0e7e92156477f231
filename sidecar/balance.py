"""Endpoint pickers: round robin, least request (power of two choices), header hash.

A picker sees the subset's endpoints that are not ejected; it returns None when
there are none. Hashing is rendezvous hashing, so removing one endpoint moves only
the keys that were on it.
"""

from __future__ import annotations

import random
import zlib

from mesh.snapshot import Endpoint
from sidecar.outlier import EndpointHealth


class Picker:
    def __init__(self, policy: str, rng: random.Random) -> None:
        self.policy = policy
        self._rng = rng
        self._next = 0

    def pick(self, healthy: list[Endpoint], health: dict[Endpoint, EndpointHealth],
             key: bytes | None) -> Endpoint | None:
        n = len(healthy)
        if n == 0:
            return None
        if n == 1:
            return healthy[0]
        if self.policy == "least_request":
            a, b = self._rng.sample(healthy, 2)
            return a if health[a].active <= health[b].active else b
        if self.policy == "hash" and key is not None:
            return max(healthy, key=lambda ep: zlib.crc32(key, zlib.crc32(str(ep).encode())))
        self._next += 1
        return healthy[self._next % n]
