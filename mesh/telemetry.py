"""The telemetry batch: what a sidecar publishes every interval. Pure: build and parse.

On the wire it is an ordinary mesh message (docs/messages.md), msgpack
``{"t": "telemetry.batch", "v": 1, "b": BODY}``, where BODY is (docs/telemetry.md):

``schema`` int (1)       ``ns``/``svc``/``inst`` str: who publishes
``epoch`` str            random per sidecar start; with ``seq`` it names a batch
``seq`` int              1, 2, 3... per epoch; a gap means lost batches
``ts`` float             unix seconds at the end of the interval
``interval`` float       seconds the batch covers
``hist`` map             {"base": 0.0001, "growth_log2": 0.25, "buckets": 80}
``pairs`` list of maps   one per (src, dst, ver) that saw requests in the interval:
    ``src``, ``dst``, ``ver`` str; ``n`` requests; ``err`` failures (5xx or no
    response); ``codes`` [0xx, 1xx, 2xx, 3xx, 4xx, 5xx] counts; ``lat`` map
    {bucket index: count}; ``lat_sum`` seconds; ``rx``/``tx`` bytes;
    ``flags`` map {response flags: count}; optional ``tcp`` map (opaque TCP, see
    TCP_KEYS): {"opened", "closed", "sent", "received", "denied"} counts. A TCP-only
    pair has ``n`` = 0, so a reader that ignores ``tcp`` sees no requests there;
    optional ``retries`` int: tries sent again after a failed try (absent: 0); a
    try that failed before an endpoint was picked (an injected abort) counts under
    ``ver`` "", so a row may carry only ``retries``.

Counts are deltas for the interval, never cumulative: a reader adds them up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from mesh.messages import MessageError, TelemetryBatch
from mesh.stats import BASE_S, CODE_CLASSES, GROWTH_LOG2, NBUCKETS, PairAgg

SCHEMA = 1
HIST_SCHEME: dict[str, Any] = {"base": BASE_S, "growth_log2": GROWTH_LOG2, "buckets": NBUCKETS}

# The optional per-row `tcp` map, in TcpAgg.as_tuple() order (docs/telemetry.md).
TCP_KEYS = ("opened", "closed", "sent", "received", "denied")
TcpCounts = tuple[int, int, int, int, int]

PairKey = tuple[str, str, str]  # (source service, destination service, destination version)


class BadBatch(MessageError):
    """A telemetry batch that does not follow the schema."""


def pair_row(key: PairKey, agg: PairAgg) -> dict[str, Any]:
    src, dst, ver = key
    row = {
        "src": src,
        "dst": dst,
        "ver": ver,
        "n": agg.requests,
        "err": agg.errors,
        "codes": list(agg.codes),
        "lat": agg.hist.sparse(),
        "lat_sum": agg.hist.sum,
        "rx": agg.rx_bytes,
        "tx": agg.tx_bytes,
        "flags": dict(agg.flags),
    }
    if agg.tcp:
        row["tcp"] = dict(zip(TCP_KEYS, agg.tcp.as_tuple(), strict=True))
    if agg.retries:
        row["retries"] = agg.retries
    return row


def build_batch(
    *,
    namespace: str,
    service: str,
    instance: str,
    epoch: str,
    seq: int,
    ts: float,
    interval: float,
    pairs: Mapping[PairKey, PairAgg],
) -> TelemetryBatch:
    return TelemetryBatch(
        schema=SCHEMA,
        ns=namespace,
        svc=service,
        inst=instance,
        epoch=epoch,
        seq=seq,
        ts=ts,
        interval=interval,
        hist=dict(HIST_SCHEME),
        pairs=[pair_row(k, a) for k, a in pairs.items() if a.requests or a.tcp or a.retries],
    )


class Row(NamedTuple):
    """One decoded pair row; `lat` stays sparse {bucket index: count}."""

    key: PairKey
    n: int
    err: int
    codes: list[int]
    lat: dict[int, int]
    lat_sum: float
    rx: int
    tx: int
    flags: dict[str, int]
    tcp: TcpCounts | None = None
    retries: int = 0

    def agg(self) -> PairAgg:
        a = PairAgg()
        a.add_row(
            self.n, self.err, self.codes, self.lat, self.lat_sum, self.rx, self.tx, self.flags,
            self.tcp, self.retries,
        )
        return a


@dataclass(frozen=True, slots=True)
class ParsedBatch:
    ns: str
    svc: str
    inst: str
    epoch: str
    seq: int
    ts: float
    interval: float
    rows: list[Row]


def parse_row(row: Mapping[str, Any]) -> Row:
    codes = row["codes"]
    if not isinstance(codes, list) or len(codes) != len(CODE_CLASSES):
        raise BadBatch(f"'codes' must be a list of {len(CODE_CLASSES)} counts")
    lat = row["lat"]
    if not isinstance(lat, dict) or not all(
        isinstance(k, int) and 0 <= k < NBUCKETS and isinstance(v, int) for k, v in lat.items()
    ):
        raise BadBatch("'lat' must map bucket indexes to counts")
    flags = row.get("flags") or {}
    tcp_raw = row.get("tcp")
    tcp: TcpCounts | None = None
    if tcp_raw is not None:
        if not isinstance(tcp_raw, dict):
            raise BadBatch("'tcp' must be a map of counts")
        o, c, s, r, d = (int(tcp_raw.get(k, 0)) for k in TCP_KEYS)
        if min(o, c, s, r, d) < 0:
            raise BadBatch("'tcp' counts must not be negative")
        tcp = (o, c, s, r, d)
    retries = int(row.get("retries", 0))
    if retries < 0:
        raise BadBatch("'retries' must not be negative")
    n, err, rx, tx = int(row["n"]), int(row["err"]), int(row.get("rx", 0)), int(row.get("tx", 0))
    code_counts = [int(c) for c in codes]
    flag_counts = {str(k): int(v) for k, v in flags.items()}
    lat_sum = float(row["lat_sum"])
    # A negative count would subtract from what other sidecars reported for the edge.
    if (min(n, err, rx, tx, *code_counts, *lat.values(), *flag_counts.values(), 0) < 0
            or not lat_sum >= 0):
        raise BadBatch("counts, bytes and 'lat_sum' must not be negative")
    return Row(
        (str(row["src"]), str(row["dst"]), str(row.get("ver", ""))),
        n,
        err,
        code_counts,
        lat,
        lat_sum,
        rx,
        tx,
        flag_counts,
        tcp,
        retries,
    )


def parse_batch(data: bytes) -> ParsedBatch:
    """Decode and check one batch from its msgpack bytes (faster than the generic decoder)."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadBatch(f"not msgpack: {exc}") from None
    if not isinstance(obj, dict) or obj.get("t") != TelemetryBatch.TYPE:
        raise BadBatch("not a telemetry.batch message")
    b = obj.get("b")
    if not isinstance(b, dict):
        raise BadBatch("telemetry.batch has no body")
    try:
        if b["schema"] > SCHEMA:
            raise BadBatch(f"schema {b['schema']} is newer than this reader ({SCHEMA})")
        hist = b["hist"]
        if (
            hist.get("buckets") != NBUCKETS
            or hist.get("base") != BASE_S
            or hist.get("growth_log2") != GROWTH_LOG2
        ):
            raise BadBatch(f"unknown histogram scheme {hist!r}")
        return ParsedBatch(
            ns=str(b["ns"]),
            svc=str(b["svc"]),
            inst=str(b["inst"]),
            epoch=str(b["epoch"]),
            seq=int(b["seq"]),
            ts=float(b["ts"]),
            interval=float(b["interval"]),
            rows=[parse_row(r) for r in b["pairs"]],
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        raise BadBatch(f"telemetry.batch does not follow schema {SCHEMA}: {exc!r}") from None
