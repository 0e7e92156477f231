"""Sliding windows (10 s, 1 m, 5 m) over per-pair aggregates, and golden signals. Pure.

Data is kept in one-second slots. Each window keeps a running sum: an arriving
aggregate is added to its slot and to every window still covering that second;
when a second leaves a window, that slot is subtracted from the window's sum.
So ingest and expiry are O(buckets touched), and reading a window never walks
its slots. Time is whatever monotonic seconds the caller passes in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh.stats import PairAgg, TcpAgg

WINDOWS: dict[str, int] = {"10s": 10, "1m": 60, "5m": 300}
_LONGEST = max(WINDOWS.values())


class WindowedAgg:
    """One-second slots of `PairAgg` with a running sum per window."""

    __slots__ = ("_first", "_now", "_slots", "_sums", "_tails")

    def __init__(self, now: float) -> None:
        sec = int(now)
        self._now = sec
        self._first = sec
        self._slots: dict[int, PairAgg] = {}
        self._sums: dict[str, PairAgg] = {w: PairAgg() for w in WINDOWS}
        # Per window: the oldest second it still covers.
        self._tails: dict[str, int] = {w: sec - n + 1 for w, n in WINDOWS.items()}

    def advance(self, now: float) -> None:
        """Move the windows' right edge to `now`, subtracting the seconds that left."""
        sec = int(now)
        if sec <= self._now:
            return
        self._now = sec
        for w, n in WINDOWS.items():
            tail = self._tails[w]
            new_tail = sec - n + 1
            if new_tail - tail > len(self._slots):
                # Jumped far: walk the slots instead of every second.
                for s, old in self._slots.items():
                    if tail <= s < new_tail:
                        self._sums[w].subtract(old)
            else:
                for s in range(tail, new_tail):
                    agg = self._slots.get(s)
                    if agg is not None:
                        self._sums[w].subtract(agg)
            self._tails[w] = new_tail
        oldest = sec - _LONGEST + 1
        for s in [s for s in self._slots if s < oldest]:
            del self._slots[s]

    def slot(self, now: float) -> tuple[PairAgg, list[PairAgg]] | None:
        """The slot for second `now` and the window sums covering it, to add data to.

        Returns None for a second older than the longest window.
        """
        self.advance(now)
        sec = int(now)
        if sec < self._now - _LONGEST + 1:
            return None
        agg = self._slots.get(sec)
        if agg is None:
            agg = self._slots[sec] = PairAgg()
        return agg, [self._sums[w] for w in WINDOWS if sec >= self._tails[w]]

    def add(self, now: float, agg: PairAgg) -> None:
        target = self.slot(now)
        if target is None:
            return
        slot, sums = target
        slot.merge(agg)
        for s in sums:
            s.merge(agg)

    def window(self, name: str, now: float) -> tuple[PairAgg, float]:
        """The sum over window `name` and its effective length in seconds.

        The effective length is shorter than the window while the pair has been
        seen for less than that (a fresh aggregator replica does not report a
        10 s burst as a 5 m average).
        """
        self.advance(now)
        n = WINDOWS[name]
        return self._sums[name], float(max(1, min(n, self._now - self._first + 1)))

    @property
    def empty(self) -> bool:
        return not self._slots


@dataclass(frozen=True)
class Golden:
    """The golden signals of one pair over one window."""

    requests: int
    rps: float
    error_rate: float
    success_rate: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    rx_bps: float
    tx_bps: float
    # Opaque TCP (0 for HTTP-only edges): connections opened and refused by policy in the
    # window, opened per second, and bytes per second each way (sent: source -> destination).
    tcp_connections: int = 0
    tcp_cps: float = 0.0
    tcp_sent_bps: float = 0.0
    tcp_received_bps: float = 0.0
    tcp_denied: int = 0
    # Retries hide failed tries from the caller: `success_rate` is what the caller saw,
    # `actual_success_rate` what the tries did (Linkerd's EFFECTIVE vs ACTUAL success).
    retries: int = 0
    actual_success_rate: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "rps": self.rps,
            "error_rate": self.error_rate,
            "success_rate": self.success_rate,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "rx_bps": self.rx_bps,
            "tx_bps": self.tx_bps,
            "tcp_connections": self.tcp_connections,
            "tcp_cps": self.tcp_cps,
            "tcp_sent_bps": self.tcp_sent_bps,
            "tcp_received_bps": self.tcp_received_bps,
            "tcp_denied": self.tcp_denied,
            "retries": self.retries,
            "actual_success_rate": self.actual_success_rate,
        }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def golden(agg: PairAgg, seconds: float) -> Golden:
    n = agg.requests
    tcp = agg.tcp or TcpAgg()
    return Golden(
        requests=n,
        rps=round(n / seconds, 3),
        error_rate=round(agg.errors / n, 4) if n else 0.0,
        success_rate=round(1 - agg.errors / n, 4) if n else 1.0,
        p50_ms=_ms(agg.hist.quantile(0.5)),
        p90_ms=_ms(agg.hist.quantile(0.9)),
        p99_ms=_ms(agg.hist.quantile(0.99)),
        rx_bps=round(agg.rx_bytes / seconds, 1),
        tx_bps=round(agg.tx_bytes / seconds, 1),
        tcp_connections=tcp.opened,
        tcp_cps=round(tcp.opened / seconds, 3),
        tcp_sent_bps=round(tcp.sent / seconds, 1),
        tcp_received_bps=round(tcp.received / seconds, 1),
        tcp_denied=tcp.denied,
        retries=agg.retries,
        actual_success_rate=(round((n - agg.errors) / (n + agg.retries), 4) if n
                             else 0.0 if agg.retries else 1.0),
    )
