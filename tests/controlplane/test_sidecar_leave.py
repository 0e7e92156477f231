"""A sidecar stopped by SIGTERM or SIGINT says goodbye: its leaving heartbeat reaches the
control plane, which drops its endpoint at once, and the sidecar exits 0 without a
traceback. Real processes (NATS, `mesh controlplane`, `mesh sidecar --nats`)."""

from __future__ import annotations

import signal

import pytest
from cp_helpers import MESH, Mesh


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_sidecar_leaves_at_once_and_quietly(mesh: Mesh, sig: int) -> None:
    name = f"leaver-{signal.Signals(sig).name.lower()}"
    # A 60 s heartbeat: expiry would take minutes, so a prompt removal can only be the leave.
    proc, _ = mesh.procs.spawn(
        name,
        [*MESH, "sidecar", "--service", "reviews", "--version", "v1", "--app-port", "9",
         "--nats", mesh.nats, "--instance", name, "--heartbeat", "60",
         "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0"],
    )  # fmt: skip
    mesh.wait_for(f"{name} registered", lambda: name in mesh.rows())

    proc.send_signal(sig)
    assert proc.wait(15) == 0
    mesh.wait_for(f"{name} gone from the registry", lambda: name not in mesh.rows(), 20)
    stderr = (mesh.tmp / f"{name}.stderr").read_text()
    assert "Traceback" not in stderr and "never awaited" not in stderr, stderr
