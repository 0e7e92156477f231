"""A per-key log budget: lines anyone on the network can trigger must not flood the log.

A port scanner or a misconfigured client can open thousands of connections a second to an
inbound listener; each refusal is worth counting (metrics do that) but not worth a log line
each. `LogThrottle` lets `burst` lines per key through per `window` seconds and reports how
many it held back on the next line it lets through. Pure logic, with the clock passed in, so
it is tested without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

# Enough distinct keys for every flag of every listener; beyond it the oldest are forgotten.
MAX_KEYS = 1024


class LogThrottle:
    def __init__(self, burst: int = 5, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or window <= 0:
            raise ValueError("LogThrottle needs burst >= 1 and window > 0")
        self.burst = burst
        self.window = window
        self._clock = clock
        # key -> [window start, lines let through in it, lines held back since the last one]
        self._keys: dict[Hashable, list[float]] = {}

    def allow(self, key: Hashable) -> tuple[bool, int]:
        """(log this line?, lines held back for this key since the last one logged)."""
        now = self._clock()
        state = self._keys.get(key)
        if state is None:
            if len(self._keys) >= MAX_KEYS:
                del self._keys[next(iter(self._keys))]
            state = self._keys[key] = [now, 0.0, 0.0]
        elif now - state[0] >= self.window:
            state[0], state[1] = now, 0.0
        if state[1] >= self.burst:
            state[2] += 1
            return False, 0
        state[1] += 1
        held, state[2] = int(state[2]), 0.0
        return True, held


def held_note(held: int) -> str:
    """The suffix that tells a reader lines are missing, or nothing."""
    return f" ({held} similar lines not logged)" if held else ""
