"""Mergeable latency histograms and per-pair aggregates. Pure: no I/O, no clocks.

Every histogram in the mesh uses the same fixed buckets, so histograms from any
number of sidecars merge by adding counts, and quantiles of the merged histogram
are as accurate as those of one sidecar (relative error below 19 %, half that on
average: the bucket growth factor is 2**0.25).

Bucket ``i`` (0 <= i < NBUCKETS - 1) holds durations ``d`` with
``upper(i - 1) < d <= upper(i)`` where ``upper(i) = BASE_S * 2 ** (i * GROWTH_LOG2)``;
bucket 0 also holds everything at or below ``BASE_S``; the last bucket holds
everything above ``upper(NBUCKETS - 2)`` (about 74 s). docs/telemetry.md repeats
this so other languages can rebuild the bounds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

BASE_S = 1e-4  # 100 µs: the upper bound of bucket 0
GROWTH_LOG2 = 0.25  # each bound is 2 ** 0.25 (about 1.19) times the previous one
NBUCKETS = 80  # 79 finite bounds (100 µs .. ~74 s) and one overflow bucket

_INV = 1.0 / GROWTH_LOG2
_LAST = NBUCKETS - 1
BOUNDS: tuple[float, ...] = tuple(BASE_S * 2 ** (i * GROWTH_LOG2) for i in range(NBUCKETS - 1))

# Response code classes, in the order of `PairAgg.codes`; "0xx" means no response
# reached the client (connection reset, protocol error before a status).
CODE_CLASSES: tuple[str, ...] = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")


def upper_bound(i: int) -> float:
    """Upper bound in seconds of bucket i (+inf for the last one)."""
    return BOUNDS[i] if i < _LAST else math.inf


def bucket_index(seconds: float) -> int:
    """The bucket of one duration: O(1), one log2."""
    if seconds <= BASE_S:
        return 0
    i = math.ceil(math.log2(seconds / BASE_S) * _INV - 1e-9)
    return i if i < _LAST else _LAST


def code_class(status: int) -> int:
    """Index into CODE_CLASSES: 1..5 for 1xx..5xx, 0 for no (or a nonsense) status."""
    c = status // 100
    return c if 1 <= c <= 5 else 0


def is_error(status: int) -> bool:
    """What the golden signals count as a failure: a 5xx, or no response at all."""
    return status >= 500 or status < 100


class Histogram:
    """Counts per fixed bucket, plus the count and the sum of observed durations."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * NBUCKETS
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bucket_index(seconds)] += 1
        self.count += 1
        self.sum += seconds

    def merge(self, other: Histogram) -> None:
        mine = self.counts
        for i, n in enumerate(other.counts):
            if n:
                mine[i] += n
        self.count += other.count
        self.sum += other.sum

    def subtract(self, other: Histogram) -> None:
        mine = self.counts
        for i, n in enumerate(other.counts):
            if n:
                mine[i] -= n
        self.count -= other.count
        self.sum -= other.sum

    def add_sparse(self, buckets: Mapping[int, int], total_s: float) -> None:
        """Add a sparse {bucket index: count} map, as carried in telemetry batches."""
        mine = self.counts
        n = 0
        for i, c in buckets.items():
            mine[i if 0 <= i < NBUCKETS else _LAST] += c
            n += c
        self.count += n
        self.sum += total_s

    def sparse(self) -> dict[int, int]:
        return {i: n for i, n in enumerate(self.counts) if n}

    def copy(self) -> Histogram:
        h = Histogram()
        h.counts = list(self.counts)
        h.count = self.count
        h.sum = self.sum
        return h

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 < q <= 1) in seconds, interpolated inside its bucket.

        None when empty. A quantile landing in the overflow bucket reports the
        last finite bound (the histogram cannot say more).
        """
        if self.count <= 0:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            if n <= 0:
                continue
            if seen + n >= rank:
                if i == _LAST:
                    return BOUNDS[-1]
                lo = BOUNDS[i - 1] if i > 0 else 0.0
                hi = BOUNDS[i]
                return lo + (hi - lo) * max(0.0, min(1.0, (rank - seen) / n))
            seen += n
        return BOUNDS[-1]

    def cumulative(self, every: int = 1) -> list[tuple[float, int]]:
        """(le, cumulative count) at finite bounds 0, every, 2*every..., then (+inf, count)."""
        out: list[tuple[float, int]] = []
        acc = 0
        for i, n in enumerate(self.counts[:_LAST]):
            acc += n
            if i % every == 0:
                out.append((BOUNDS[i], acc))
        out.append((math.inf, self.count))
        return out


class TcpAgg:
    """What one pair did over opaque TCP: connections and bytes, seen by the caller's sidecar
    (`denied`: by the destination's, which refused the connection by policy)."""

    __slots__ = ("closed", "denied", "opened", "received", "sent")

    def __init__(
        self, opened: int = 0, closed: int = 0, sent: int = 0, received: int = 0, denied: int = 0
    ) -> None:
        self.opened = opened
        self.closed = closed
        self.sent = sent  # bytes the source sent to the destination
        self.received = received  # bytes the source received from it
        self.denied = denied

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.opened, self.closed, self.sent, self.received, self.denied)

    def __bool__(self) -> bool:
        return any(self.as_tuple())

    def add(self, opened: int, closed: int, sent: int, received: int, denied: int) -> None:
        self.opened += opened
        self.closed += closed
        self.sent += sent
        self.received += received
        self.denied += denied

    def merge(self, other: TcpAgg) -> None:
        self.add(*other.as_tuple())

    def subtract(self, other: TcpAgg) -> None:
        self.add(*(-n for n in other.as_tuple()))


class PairAgg:
    """What one (source, destination, version) pair did: counts, codes, latency, bytes;
    `tcp` (None until a pair has opaque TCP traffic) its TCP connections and bytes."""

    __slots__ = ("codes", "errors", "flags", "hist", "requests", "retries", "rx_bytes", "tcp",
                 "tx_bytes")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.codes: list[int] = [0] * len(CODE_CLASSES)
        self.hist = Histogram()
        self.rx_bytes = 0  # request bytes received from the client
        self.tx_bytes = 0  # response bytes sent back to it
        self.flags: dict[str, int] = {}
        self.tcp: TcpAgg | None = None
        # Tries sent again after a failed try (each retry follows one failed try), so the
        # tries' own success rate is (requests - errors) / (requests + retries).
        self.retries = 0

    def tcp_agg(self) -> TcpAgg:
        tcp = self.tcp
        if tcp is None:
            tcp = self.tcp = TcpAgg()
        return tcp

    def observe(
        self, status: int, flags: str, seconds: float, rx_bytes: int, tx_bytes: int
    ) -> None:
        self.requests += 1
        c = status // 100
        self.codes[c if 1 <= c <= 5 else 0] += 1
        if status >= 500 or status < 100:
            self.errors += 1
        self.hist.observe(seconds)
        self.rx_bytes += rx_bytes
        self.tx_bytes += tx_bytes
        if flags:
            self.flags[flags] = self.flags.get(flags, 0) + 1

    def add_row(
        self,
        requests: int,
        errors: int,
        codes: list[int],
        lat: Mapping[int, int],
        lat_sum: float,
        rx_bytes: int,
        tx_bytes: int,
        flags: Mapping[str, int],
        tcp: tuple[int, int, int, int, int] | None = None,
        retries: int = 0,
    ) -> None:
        """Add one telemetry row (sparse histogram): cheaper than building a PairAgg."""
        if tcp is not None:
            self.tcp_agg().add(*tcp)
        self.requests += requests
        self.retries += retries
        self.errors += errors
        mine = self.codes
        for i, n in enumerate(codes):
            mine[i] += n
        self.hist.add_sparse(lat, lat_sum)
        self.rx_bytes += rx_bytes
        self.tx_bytes += tx_bytes
        for f, n in flags.items():
            self.flags[f] = self.flags.get(f, 0) + n

    def merge(self, other: PairAgg) -> None:
        self.requests += other.requests
        self.retries += other.retries
        self.errors += other.errors
        for i, n in enumerate(other.codes):
            self.codes[i] += n
        self.hist.merge(other.hist)
        self.rx_bytes += other.rx_bytes
        self.tx_bytes += other.tx_bytes
        for f, n in other.flags.items():
            self.flags[f] = self.flags.get(f, 0) + n
        if other.tcp is not None:
            self.tcp_agg().merge(other.tcp)

    def subtract(self, other: PairAgg) -> None:
        self.requests -= other.requests
        self.retries -= other.retries
        self.errors -= other.errors
        for i, n in enumerate(other.codes):
            self.codes[i] -= n
        self.hist.subtract(other.hist)
        self.rx_bytes -= other.rx_bytes
        self.tx_bytes -= other.tx_bytes
        for f, n in other.flags.items():
            left = self.flags.get(f, 0) - n
            if left:
                self.flags[f] = left
            else:
                self.flags.pop(f, None)
        if other.tcp is not None:
            self.tcp_agg().subtract(other.tcp)


def merge_all(aggs: Iterable[PairAgg]) -> PairAgg:
    out = PairAgg()
    for a in aggs:
        out.merge(a)
    return out
