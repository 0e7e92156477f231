"""The service graph an aggregator keeps: edges (src -> dst) with windowed signals. Pure.

Batches are deltas named by (sidecar instance, epoch, seq). `GraphState.ingest`
counts a batch at most once: a batch whose seq is not newer than the last one
seen for that instance and epoch is a duplicate and is ignored (a resend, or a
replayed message after a reconnect); a gap in seq is counted as lost batches.
Every aggregator replica ingests every batch (no queue group), so each replica
holds the whole graph and a failover loses nothing and counts nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.stats import PairAgg
from mesh.stats_window import WINDOWS, WindowedAgg, golden
from mesh.telemetry import ParsedBatch

Edge = tuple[str, str]  # (source service, destination service)

# Instances not heard from for this long are forgotten (their seq state).
INSTANCE_TTL_S = 600.0


@dataclass
class IngestStats:
    batches: int = 0
    rows: int = 0
    duplicates: int = 0
    lost: int = 0  # batches missing from seq gaps
    bad: int = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "batches": self.batches,
            "rows": self.rows,
            "duplicates": self.duplicates,
            "lost": self.lost,
            "bad": self.bad,
        }


@dataclass
class _Instance:
    epoch: str
    seq: int
    seen: float


@dataclass
class GraphState:
    edges: dict[Edge, WindowedAgg] = field(default_factory=dict)
    totals: dict[Edge, PairAgg] = field(default_factory=dict)  # since this replica started
    instances: dict[tuple[str, str, str], _Instance] = field(default_factory=dict)
    stats: IngestStats = field(default_factory=IngestStats)

    def ingest(self, batch: ParsedBatch, now: float) -> bool:
        """Merge one batch; False if it was a duplicate."""
        ikey = (batch.ns, batch.svc, batch.inst)
        inst = self.instances.get(ikey)
        if inst is not None and inst.epoch == batch.epoch:
            if batch.seq <= inst.seq:
                self.stats.duplicates += 1
                return False
            self.stats.lost += batch.seq - inst.seq - 1
            inst.seq = batch.seq
            inst.seen = now
        else:
            self.instances[ikey] = _Instance(batch.epoch, batch.seq, now)
        self.stats.batches += 1
        for row in batch.rows:
            self.stats.rows += 1
            ekey = (row.key[0], row.key[1])
            w = self.edges.get(ekey)
            if w is None:
                w = self.edges[ekey] = WindowedAgg(now)
                self.totals[ekey] = PairAgg()
            args = (
                row.n, row.err, row.codes, row.lat, row.lat_sum, row.rx, row.tx, row.flags, row.tcp,
                row.retries,
            )
            self.totals[ekey].add_row(*args)
            target = w.slot(now)
            if target is not None:
                slot, sums = target
                slot.add_row(*args)
                for s in sums:
                    s.add_row(*args)
        return True

    def expire(self, now: float) -> None:
        """Forget instances gone quiet, and edges idle for longer than the longest window."""
        for k in [k for k, i in self.instances.items() if now - i.seen > INSTANCE_TTL_S]:
            del self.instances[k]
        for e, w in list(self.edges.items()):
            w.advance(now)
            if w.empty:
                del self.edges[e]

    def edge_signals(self, edge: Edge, now: float) -> dict[str, dict[str, Any]]:
        w = self.edges[edge]
        out: dict[str, dict[str, Any]] = {}
        for name in WINDOWS:
            agg, seconds = w.window(name, now)
            out[name] = golden(agg, seconds).to_dict()
        return out

    def graph(self, window: str, now: float) -> tuple[list[str], list[dict[str, Any]]]:
        """Nodes and edges with the golden signals over `window` (one of WINDOWS)."""
        nodes: set[str] = set()
        edges: list[dict[str, Any]] = []
        for (src, dst), w in sorted(self.edges.items()):
            agg, seconds = w.window(window, now)
            # An edge shows when it carried requests or opaque TCP in the window; TCP-only
            # edges are marked so a reader does not take their 0 requests for idleness.
            if agg.requests <= 0 and not agg.tcp:
                continue
            nodes.update((src, dst))
            protocol = "http" if agg.requests > 0 else "tcp"
            edges.append(
                {"src": src, "dst": dst, "protocol": protocol, **golden(agg, seconds).to_dict()}
            )
        return sorted(nodes), edges
