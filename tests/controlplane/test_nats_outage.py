"""NATS itself goes away: sidecars keep serving their last good snapshot with 0 errors, and
everything resyncs when it returns (a change written after the return reaches them)."""

from __future__ import annotations

from pathlib import Path

from cp_helpers import Mesh
from test_e2e import BASE


def test_sidecars_outlive_nats_and_resync(mesh: Mesh, tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    mesh.ok("apply", "-f", str(tmp_path / "base.yaml"), "--wait", "15")
    assert mesh.traffic(20) == {"v1": 20}
    mesh.stop_nats()
    assert mesh.traffic(300) == {"v1": 300}  # no NATS, no control plane: 0 errors
    mesh.nats_proc, _ = mesh.start_nats(mesh.nats.rsplit(":", 1)[1])
    out = mesh.ok("route", "weights", "reviews", "v1=0", "v2=100", "--wait", "30")
    assert "synced: 3 sidecar(s)" in out
    assert mesh.traffic(20) == {"v2": 20}
