"""Retry budget (like Linkerd's) and backoff with jitter. Pure: the clock is passed in.

Retries are allowed while retries in the window stay below
`min_per_second * window + ratio * requests in the window`, so retries cannot
multiply the load on a failing cluster by more than `1 + ratio`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mesh.snapshot import Backoff, RetryBudget

_BUCKETS = 10


class Budget:
    def __init__(self, config: RetryBudget, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._width = config.window_seconds / _BUCKETS
        self._requests = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._epoch = int(clock() / self._width)

    def _advance(self) -> int:
        now = int(self._clock() / self._width)
        if now != self._epoch:
            # Clear the buckets that fell out of the window since the last call.
            for tick in range(self._epoch + 1, min(now, self._epoch + _BUCKETS) + 1):
                self._requests[tick % _BUCKETS] = 0
                self._retries[tick % _BUCKETS] = 0
            self._epoch = now
        return now % _BUCKETS

    def on_request(self) -> None:
        self._requests[self._advance()] += 1

    def try_retry(self) -> bool:
        """Withdraw one retry if the budget allows it."""
        i = self._advance()
        c = self.config
        allowed = c.min_per_second * c.window_seconds + c.ratio * sum(self._requests)
        if sum(self._retries) + 1 > allowed:
            return False
        self._retries[i] += 1
        return True


def backoff_delay(policy: Backoff, attempt: int, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, base * 2**attempt)] (attempt counts from 0)."""
    cap = min(policy.max, policy.base * (2 ** min(attempt, 30)))
    return rng.uniform(0, cap)
