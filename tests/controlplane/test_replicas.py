"""Two control-plane replicas: the holder of the `config` lease pushes; when it dies, the other
one takes the lease over and changes keep reaching the sidecars."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from cp_helpers import Mesh
from test_e2e import BASE


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, object]]:
    m = Mesh(tmp_path_factory.mktemp("replicas"))
    try:
        second = m.start_controlplane("cp-2")
        yield m, second
    finally:
        m.close()


def test_the_standby_takes_over_pushing(two: tuple[Mesh, object], tmp_path: Path) -> None:
    mesh, _ = two
    (tmp_path / "base.yaml").write_text(BASE)
    mesh.ok("apply", "-f", str(tmp_path / "base.yaml"), "--wait", "15")
    mesh.ok("route", "weights", "reviews", "v1=0", "v2=100", "--wait", "15")
    assert mesh.traffic(20) == {"v2": 20}
    mesh.procs.stop(mesh.cp, signal.SIGKILL)  # cp-1 started first: it holds the lease
    assert mesh.traffic(100) == {"v2": 100}
    out = mesh.ok("route", "weights", "reviews", "v1=100", "v2=0", "--wait", "20")
    assert "synced: 3 sidecar(s)" in out
    assert mesh.status()["replica"] == "cp-2"
    # (a loaded machine can make a holder step down and take the lease back: wait, not sample)
    mesh.wait_for("cp-2 to lead", lambda: bool(mesh.status()["stats"]["leading"]))
    assert mesh.traffic(20) == {"v1": 20}
