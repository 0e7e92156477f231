"""Pure tests of the telemetry cores: histograms, windows, the batch schema, the graph."""

from __future__ import annotations

import copy
import math
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.messages import decode, encode
from mesh.stats import BOUNDS, NBUCKETS, Histogram, PairAgg, TcpAgg, bucket_index, code_class
from mesh.stats_graph import GraphState
from mesh.stats_window import WindowedAgg, golden
from mesh.telemetry import BadBatch, build_batch, parse_batch


def test_bucket_bounds_are_upper_inclusive_and_log_spaced() -> None:
    assert len(BOUNDS) == NBUCKETS - 1
    assert bucket_index(0.0) == 0
    assert bucket_index(1e-4) == 0
    assert bucket_index(1.0001e-4) == 1
    for i, b in enumerate(BOUNDS):
        assert bucket_index(b) == i
        assert bucket_index(b * 1.0001) == i + 1
    assert bucket_index(1e6) == NBUCKETS - 1
    assert BOUNDS[4] == pytest.approx(2e-4)
    assert BOUNDS[-1] == pytest.approx(1e-4 * 2**19.5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=1e-5, max_value=30.0), min_size=1, max_size=300))
def test_merge_equals_observing_everything_in_one(values: list[float]) -> None:
    half = len(values) // 2
    a, b, whole = Histogram(), Histogram(), Histogram()
    for v in values[:half]:
        a.observe(v)
    for v in values[half:]:
        b.observe(v)
    for v in values:
        whole.observe(v)
    a.merge(b)
    assert a.counts == whole.counts and a.count == whole.count
    assert a.sum == pytest.approx(whole.sum)
    a.subtract(b)
    assert sum(a.counts) == half
    # Sparse round trip, as in a batch.
    c = Histogram()
    c.add_sparse(whole.sparse(), whole.sum)
    assert c.counts == whole.counts


def test_quantiles_from_merged_histograms_are_within_one_bucket() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(math.log(0.005), 1.0) for _ in range(20000)]
    parts = [Histogram() for _ in range(10)]
    for i, v in enumerate(values):
        parts[i % 10].observe(v)
    merged = Histogram()
    for p in parts:
        merged.merge(p)
    values.sort()
    for q in (0.5, 0.9, 0.99):
        exact = values[int(q * len(values)) - 1]
        got = merged.quantile(q)
        assert got is not None
        assert abs(got - exact) / exact < 0.19, (q, got, exact)
    assert Histogram().quantile(0.5) is None


def test_pair_agg_counts_codes_errors_and_flags() -> None:
    a = PairAgg()
    for status in (200, 201, 404, 500, 503, 0):
        a.observe(status, "UF" if status == 0 else "", 0.01, 10, 20)
    assert a.requests == 6 and a.errors == 3
    assert a.codes == [1, 0, 2, 0, 1, 2]
    assert a.flags == {"UF": 1}
    assert (a.rx_bytes, a.tx_bytes) == (60, 120)
    assert code_class(700) == 0


def _agg(n: int, errors: int, seconds: float = 0.01) -> PairAgg:
    a = PairAgg()
    for i in range(n):
        a.observe(500 if i < errors else 200, "", seconds, 1, 1)
    return a


def test_windows_expire_each_second_exactly_once() -> None:
    w = WindowedAgg(now=1000.0)
    for t in range(1000, 1300):
        w.add(t + 0.5, _agg(2, 1))
    ten, secs10 = w.window("10s", 1299.9)
    minute, secs60 = w.window("1m", 1299.9)
    five, secs300 = w.window("5m", 1299.9)
    assert (ten.requests, secs10) == (20, 10)
    assert (minute.requests, secs60) == (120, 60)
    assert (five.requests, secs300) == (600, 300)
    assert golden(ten, secs10).rps == 2.0 and golden(ten, secs10).error_rate == 0.5
    # Ten idle seconds empty the 10 s window only.
    ten, _ = w.window("10s", 1309.5)
    assert ten.requests == 0 and ten.hist.count == 0
    assert w.window("1m", 1309.5)[0].requests == 100
    # A long jump empties everything and drops the slots.
    assert w.window("5m", 5000.0)[0].requests == 0
    assert w.empty


def test_a_fresh_window_reports_rate_over_the_time_it_has_seen() -> None:
    w = WindowedAgg(now=50.0)
    w.add(50.1, _agg(10, 0))
    w.add(51.1, _agg(10, 0))
    agg, secs = w.window("5m", 51.5)
    assert secs == 2 and golden(agg, secs).rps == 10.0


def test_late_data_for_a_second_still_in_window_is_added_and_later_expired() -> None:
    w = WindowedAgg(now=100.0)
    w.add(105.0, _agg(1, 0))
    w.add(100.5, _agg(1, 0))  # late, but inside every window
    assert w.window("10s", 105.5)[0].requests == 2
    assert w.window("10s", 110.5)[0].requests == 1
    assert w.window("10s", 115.5)[0].requests == 0


def _batch(seq: int, n: int, errors: int, *, epoch: str = "e1", inst: str = "a-1") -> bytes:
    b = build_batch(
        namespace="default",
        service="a",
        instance=inst,
        epoch=epoch,
        seq=seq,
        ts=1.0,
        interval=1.0,
        pairs={("a", "b", "v1"): _agg(n, errors)},
    )
    return encode(b)


def test_batch_round_trip_through_the_generic_decoder_and_the_fast_parser() -> None:
    data = _batch(1, 5, 2)
    msg = decode(data)
    assert msg.TYPE == "telemetry.batch"
    raw = msgpack.unpackb(data, strict_map_key=False)
    assert raw["v"] == 1 and raw["b"]["schema"] == 1
    row = raw["b"]["pairs"][0]
    assert set(row) == {
        "src",
        "dst",
        "ver",
        "n",
        "err",
        "codes",
        "lat",
        "lat_sum",
        "rx",
        "tx",
        "flags",
    }
    parsed = parse_batch(data)
    assert parsed.seq == 1 and parsed.rows[0].key == ("a", "b", "v1")
    assert parsed.rows[0].agg().requests == 5 and parsed.rows[0].agg().errors == 2


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(t="ping"),
        lambda m: m["b"].update(schema=99),
        lambda m: m["b"]["hist"].update(buckets=10),
        lambda m: m["b"]["pairs"][0].update(codes=[1, 2]),
        lambda m: m["b"]["pairs"][0].update(lat={999: 1}),
        lambda m: m["b"]["pairs"][0].pop("n"),
        lambda m: m["b"].update(pairs=[[1, 2]]),
    ],
)
def test_batches_off_schema_are_refused(mutate: object) -> None:
    m = msgpack.unpackb(_batch(1, 3, 0), strict_map_key=False)
    mutate(m)  # type: ignore[operator]
    with pytest.raises(BadBatch):
        parse_batch(msgpack.packb(m))
    with pytest.raises(BadBatch):
        parse_batch(b"\xc1garbage")


def test_graph_counts_each_batch_once_and_counts_gaps() -> None:
    g = GraphState()
    assert g.ingest(parse_batch(_batch(1, 10, 1)), 10.0)
    assert not g.ingest(parse_batch(_batch(1, 10, 1)), 10.1)  # resent: ignored
    assert g.ingest(parse_batch(_batch(4, 10, 1)), 11.0)  # 2 and 3 lost
    assert g.ingest(parse_batch(_batch(1, 10, 1, epoch="e2")), 11.2)  # the sidecar restarted
    assert g.ingest(parse_batch(_batch(1, 10, 1, inst="a-2")), 11.3)
    assert (g.stats.batches, g.stats.duplicates, g.stats.lost) == (4, 1, 2)
    nodes, edges = g.graph("10s", 11.5)
    assert nodes == ["a", "b"]
    assert edges[0]["requests"] == 40 and edges[0]["error_rate"] == 0.1
    assert g.totals[("a", "b")].requests == 40
    g.expire(400.0)
    assert g.graph("5m", 400.0) == ([], [])


def test_retries_travel_in_the_batch_and_split_effective_from_actual_success() -> None:
    # 100 requests, 2 failed in the end; 18 retries, each after a failed try: the caller saw
    # 98% success, the 118 tries succeeded 98 times.
    agg = _agg(100, 2)
    agg.retries = 18
    b = build_batch(namespace="default", service="a", instance="a-1", epoch="e", seq=1,
                    ts=1.0, interval=1.0, pairs={("a", "b", "v1"): agg})
    data = encode(b)
    assert msgpack.unpackb(data, strict_map_key=False)["b"]["pairs"][0]["retries"] == 18
    g = GraphState()
    assert g.ingest(parse_batch(data), 10.0)
    _, [edge] = g.graph("10s", 10.5)
    assert (edge["retries"], edge["success_rate"]) == (18, 0.98)
    assert edge["actual_success_rate"] == round(98 / 118, 4)
    # A row without retries (an older sidecar) reads as none, and the two rates agree.
    plain = parse_batch(_batch(1, 10, 1))
    assert plain.rows[0].retries == 0
    g2 = GraphState()
    g2.ingest(plain, 10.0)
    _, [e2] = g2.graph("10s", 10.5)
    assert e2["actual_success_rate"] == e2["success_rate"] == 0.9
    m = msgpack.unpackb(data, strict_map_key=False)
    m["b"]["pairs"][0]["retries"] = -1
    with pytest.raises(BadBatch, match="retries"):
        parse_batch(msgpack.packb(m))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=-1, max_value=1200),
            st.sampled_from(["", "UF", "UT,URX"]),
            st.floats(min_value=0, max_value=1e5, allow_nan=False),
        ),
        max_size=50,
    )
)
def test_the_recorders_inlined_hot_path_matches_pair_agg(
    requests: list[tuple[int, str, float]],
) -> None:
    from sidecar.telemetry import Recorder

    r = Recorder("default", "a", "a-1")
    ref = PairAgg()
    for code, flags, seconds in requests:
        r.record("a", "b", "v1", code, flags, seconds, 3, 4)
        ref.observe(code, flags, seconds, 3, 4)
    r.fold()  # the request path only queues; the fold aggregates
    got = r.current.get(("a", "b", "v1"), PairAgg())
    assert (got.requests, got.errors, got.codes, got.flags) == (
        ref.requests,
        ref.errors,
        ref.codes,
        ref.flags,
    )
    assert got.hist.counts == ref.hist.counts and (got.rx_bytes, got.tx_bytes) == (
        ref.rx_bytes,
        ref.tx_bytes,
    )
    assert sum(r.requests.values()) == len(requests)
    assert all(k[3] == 0 or 100 <= k[3] <= 599 for k in r.requests)


def _batch_bytes(svc: str, pairs: dict[tuple[str, str, str], PairAgg]) -> bytes:
    return encode(build_batch(namespace="default", service=svc, instance=f"{svc}-1", epoch="e",
                              seq=1, ts=1.7e9, interval=1.0, pairs=pairs))


def test_a_sidecar_reports_its_calls_and_only_what_no_caller_reports() -> None:
    """actors/telemetry.from_sender: a sidecar of `alpha` may not rewrite beta -> alpha (its
    callers' record of its own failures); it may report callers outside the mesh and TCP
    connections it refused."""
    from actors.telemetry import from_sender
    from bus import subjects

    subject = subjects.telemetry("default", "alpha", "alpha-1")
    own, unknown, refused, forged = PairAgg(), PairAgg(), PairAgg(), PairAgg()
    own.observe(200, "", 0.01, 1, 2)
    unknown.observe(200, "", 0.01, 1, 2)
    refused.tcp = TcpAgg(denied=3)
    forged.observe(200, "", 0.01, 1, 2)
    ok = parse_batch(_batch_bytes("alpha", {("alpha", "beta", "v1"): own,
                                            ("unknown", "alpha", ""): unknown,
                                            ("beta", "alpha", ""): refused}))
    assert from_sender(subject, ok)
    assert not from_sender(subjects.telemetry("default", "alpha", "alpha-2"), ok)
    for pairs in ({("beta", "alpha", ""): forged}, {("beta", "gamma", ""): own}):
        assert not from_sender(subject, parse_batch(_batch_bytes("alpha", pairs)))
    opened = PairAgg()
    opened.tcp = TcpAgg(opened=1)
    assert not from_sender(subject, parse_batch(_batch_bytes("alpha", {("beta", "alpha", ""): opened})))


def test_negative_counts_are_refused() -> None:
    agg = PairAgg()
    agg.observe(500, "", 0.01, 1, 2)
    m = msgpack.unpackb(_batch_bytes("alpha", {("alpha", "beta", "v1"): agg}), strict_map_key=False)
    for field, value in (("err", -1), ("n", -5), ("rx", -1), ("lat_sum", -0.5)):
        bad = copy.deepcopy(m)
        bad["b"]["pairs"][0][field] = value
        with pytest.raises(BadBatch, match="negative"):
            parse_batch(msgpack.packb(bad))
    bad = copy.deepcopy(m)
    bad["b"]["pairs"][0]["codes"][5] = -40
    with pytest.raises(BadBatch, match="negative"):
        parse_batch(msgpack.packb(bad))
