"""Telemetry with real processes: `mesh controlplane`, `mesh top`, `mesh telemetry`, and a
raw nats-py consumer that only knows docs/telemetry.md."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from telemetry_helpers import CHAIN, mesh, process, read_json_line, simulate

from bus.client import connect
from bus.server import NatsServer
from sidecar.telemetry import Recorder, TelemetryPublisher

MESH = [sys.executable, "-m", "mesh"]
HERE = Path(__file__).parent


async def test_top_and_raw_consumer_see_the_chain_through_real_processes(
    nats_server: NatsServer,
) -> None:
    url = nats_server.url
    recorders = {s: Recorder("default", s, f"{s}-1") for s in ("frontend", "backend")}
    async with (
        process(
            [*MESH, "controlplane", "--nats", url, "--replica", "cp-1", "--ready-line"],
            env={"MESH_METRICS_PORT": "0", "MESH_DASHBOARD_PORT": "0", "MESH_CA_SECRET": "s" * 32},
        ) as cp,
        process([sys.executable, str(HERE / "raw_nats_subscriber.py"), url, "2"]) as raw,
        process([*MESH, "telemetry", "--nats", url, "-n", "1"]) as tail,
        connect(url, name="sidecars") as bus,
        trio.open_nursery() as nursery,
    ):
        await read_json_line(cp, "event")
        await read_json_line(raw, "ready")
        # `mesh telemetry` is ready once connected; give it the time to subscribe by
        # publishing until it prints (its count is 1).
        publishers = [TelemetryPublisher(r, bus, interval=0.2) for r in recorders.values()]
        for p in publishers:
            await nursery.start(p.run)
        simulate(recorders)

        # The raw consumer decoded both sidecars' batches from the docs alone.
        result = await read_json_line(raw, "batches")
        pairs = result["pairs"]
        assert pairs["frontend->backend"]["n"] == 100
        assert pairs["frontend->backend"]["err"] == 10
        assert pairs["frontend->backend"]["5xx"] == 10
        assert pairs["frontend->backend"]["lat_count"] == 100
        assert pairs["backend->db"] == {
            "n": 50,
            "err": 0,
            "5xx": 0,
            "lat_count": 50,
            "max_le_us": 2691,
        }

        # `mesh top --once --json` against the real control plane.
        with trio.fail_after(20):
            while True:
                out = await mesh("top", "--nats", url, "--once", "--json", "--window", "1m")
                assert out.returncode == 0, out.stderr.decode()
                snap = json.loads(out.stdout)
                edges = {(e["src"], e["dst"]): e for e in snap["edges"]}
                if all(edges.get((s, d), {}).get("requests") == n for s, d, _, n, _ in CHAIN):
                    break
                await trio.sleep(0.1)
        assert edges[("frontend", "backend")]["error_rate"] == 0.1
        assert edges[("frontend", "backend")]["success_rate"] == 0.9
        assert edges[("backend", "db")]["error_rate"] == 0.0
        assert snap["replica"] == "cp-1" and snap["ingest"]["batches"] >= 2

        text = await mesh("top", "--nats", url, "--once", "--window", "1m")
        lines = text.stdout.decode().splitlines()
        assert lines[0].split() == ["SRC", "DST", "RPS", "SUCCESS", "TRIES", "RETRIES", "REQUESTS",
                                    "P50", "P90", "P99"]
        row = next(line.split() for line in lines if line.startswith("frontend"))
        # No retries here: the tries' success rate is the callers'.
        assert row[:2] == ["frontend", "backend"] and row[3:7] == ["90.00%", "90.00%", "0", "100"]

        # Keep traffic flowing until `mesh telemetry -n 1` has printed a decoded batch.
        line: dict[str, Any] = {}
        with trio.fail_after(20):
            while not line:
                simulate(recorders)
                with trio.move_on_after(0.5):
                    line = await read_json_line(tail, "subject", timeout=30)
        assert line["type"] == "telemetry.batch"
        assert line["subject"].startswith("mesh.telemetry.default.")
        assert line["body"]["schema"] == 1 and line["body"]["pairs"]
        nursery.cancel_scope.cancel()


async def test_top_without_a_control_plane_is_a_one_line_error(nats_server: NatsServer) -> None:
    out = await mesh("top", "--nats", nats_server.url, "--once", "--timeout", "0.5")
    assert out.returncode == 1
    err = out.stderr.decode()
    assert "no telemetry aggregator answered" in err and "Traceback" not in err


async def test_mesh_top_survives_a_replica_failover_without_double_counting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `mesh up` replicas; one is SIGKILLed and restarted by `mesh up` with an empty
    graph: `mesh top` keeps answering with the survivor's complete counts, each batch once."""
    recorders = {s: Recorder("default", s, f"{s}-1") for s in ("frontend", "backend")}
    async with process(
        [
            *MESH,
            "up",
            "--nats-port",
            "0",
            "--replicas",
            "2",
            "--state-dir",
            str(tmp_path / "st"),
            "--ready-line",
        ],
        env={"MESH_METRICS_PORT": "0", "MESH_DASHBOARD_PORT": "0"},
    ) as up:
        info = await read_json_line(up, "event", timeout=40)
        url = info["nats"][0]
        # `mesh up`'s NATS has users: the CLI finds admin.json there, the fake sidecars use
        # the sidecar role.
        monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path / "st"))
        sidecar_creds = str(tmp_path / "st" / "nats-creds" / "sidecar.json")
        async with (
            connect(url, name="sidecars", creds_file=sidecar_creds) as bus,
            trio.open_nursery() as nursery,
        ):
            for r in recorders.values():
                await nursery.start(TelemetryPublisher(r, bus, interval=0.1).run)

            async def top_until(scale: int) -> dict[str, Any]:
                with trio.fail_after(20):
                    while True:
                        out = await mesh("top", "--nats", url, "--once", "--json", "--window", "5m")
                        assert out.returncode == 0, out.stderr.decode()
                        snap: dict[str, Any] = json.loads(out.stdout)
                        edges = {(e["src"], e["dst"]): e for e in snap["edges"]}
                        if all(
                            edges.get((s, d), {}).get("requests") == n * scale
                            for s, d, _, n, _ in CHAIN
                        ):
                            return snap
                        await trio.sleep(0.1)

            simulate(recorders)
            await top_until(1)
            os.kill(info["replicas"]["cp-1"], signal.SIGKILL)
            simulate(recorders)
            snap = await top_until(2)
            assert snap["replica"] == "cp-2" and snap["ingest"]["duplicates"] == 0
            # cp-1 comes back (mesh up restarts it) with only what it saw since: still cp-2.
            with trio.fail_after(20):
                while True:
                    out = await mesh("ping", "--nats", url, "--json", "-c", "4")
                    replicas = {json.loads(line)["replica"] for line in out.stdout.splitlines()}
                    if replicas == {"cp-1", "cp-2"}:
                        break
            simulate(recorders)
            for _ in range(3):
                snap = await top_until(3)
                assert snap["replica"] == "cp-2"
            nursery.cancel_scope.cancel()
