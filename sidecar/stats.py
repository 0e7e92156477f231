"""Counters kept as plain ints on the hot path and exported as Prometheus text on scrape.

The full metrics set (histograms, per-pair aggregates) is a later issue; these are the
counters tests and operators need now.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class Stats:
    def __init__(self) -> None:
        self.responses: Counter[tuple[str, int]] = Counter()  # (listener, status)
        self.flags: Counter[tuple[str, str]] = Counter()  # (listener, flag)
        self.retries = 0
        self.budget_exhausted = 0
        self.downstream_connections = 0
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.snapshot_version = ""
        self.ejections = 0
        self.upstream_connections = 0
        # mTLS (sidecar/mtls.py): (direction, flag) of refused handshakes, (direction, kind)
        # of accepted connections, and the certificate's seconds to expiry (None: no identity)
        self.tls_refused: Counter[tuple[str, str]] = Counter()
        self.tls_handshakes: Counter[tuple[str, str]] = Counter()
        self.cert_expiry: Callable[[], float] | None = None
        # Route mirrors (sidecar/mirror.py): copies sent, copies that got no response,
        # and requests not mirrored, by reason (body, busy, no_endpoint, unavailable).
        self.mirrored = 0
        self.mirror_failed = 0
        self.mirror_skipped: Counter[str] = Counter()


class StatsCollector(Collector):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.stats
        responses = CounterMetricFamily("mesh_sidecar_responses", "responses sent downstream",
                                        labels=["listener", "code"])
        for (listener, status), n in sorted(s.responses.items()):
            responses.add_metric([listener, str(status)], n)
        yield responses
        flags = CounterMetricFamily("mesh_sidecar_local_replies",
                                    "replies made by the sidecar, by flag",
                                    labels=["listener", "flag"])
        for (listener, flag), n in sorted(s.flags.items()):
            flags.add_metric([listener, flag], n)
        yield flags
        refused = CounterMetricFamily("mesh_sidecar_tls_refused",
                                      "mTLS handshakes refused, by direction and flag",
                                      labels=["direction", "flag"])
        for (direction, flag), n in sorted(s.tls_refused.items()):
            refused.add_metric([direction, flag], n)
        yield refused
        accepted = CounterMetricFamily("mesh_sidecar_tls_connections",
                                       "connections accepted or opened, by direction and kind "
                                       "(mtls, plaintext)", labels=["direction", "kind"])
        for (direction, kind), n in sorted(s.tls_handshakes.items()):
            accepted.add_metric([direction, kind], n)
        yield accepted
        skipped = CounterMetricFamily("mesh_sidecar_mirror_skipped",
                                      "requests a route would mirror that were not copied, "
                                      "by reason (body: not buffered, busy: too many copies "
                                      "in flight, no_endpoint, unavailable)",
                                      labels=["reason"])
        for reason, n in sorted(s.mirror_skipped.items()):
            skipped.add_metric([reason], n)
        yield skipped
        if s.cert_expiry is not None:
            expiry = GaugeMetricFamily("mesh_sidecar_cert_seconds_to_expiry",
                                       "seconds until the sidecar's certificate expires")
            expiry.add_metric([], s.cert_expiry())
            yield expiry
        for name, value, text in (
            ("mesh_sidecar_retries", s.retries, "retries sent upstream"),
            ("mesh_sidecar_retry_budget_exhausted", s.budget_exhausted,
             "retries refused by the budget"),
            ("mesh_sidecar_downstream_connections", s.downstream_connections,
             "connections accepted"),
            ("mesh_sidecar_upstream_connections", s.upstream_connections,
             "connections opened upstream"),
            ("mesh_sidecar_outlier_ejections", s.ejections, "endpoints ejected"),
            ("mesh_sidecar_mirrored", s.mirrored, "request copies sent to route mirrors"),
            ("mesh_sidecar_mirror_failed", s.mirror_failed,
             "mirror copies that got no response (connect failure, reset, timeout)"),
            ("mesh_sidecar_reloads_ok", s.reloads_ok, "snapshots loaded"),
            ("mesh_sidecar_reloads_failed", s.reloads_failed, "snapshots refused"),
        ):
            c = CounterMetricFamily(name, text)
            c.add_metric([], value)
            yield c
