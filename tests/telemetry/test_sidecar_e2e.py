"""Observability with no app instrumentation, through real `mesh sidecar` processes:
client -> frontend -> backend -> db, each app behind its own sidecar, telemetry on NATS,
the aggregator in a real `mesh controlplane`. Checks sidecar /metrics, `mesh top --once
--json`, one trace across the hops (`mesh trace`), and access-log lines."""

from __future__ import annotations

import json
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from telemetry_helpers import MESH, http_get, mesh, process, read_json_line, sample

from bus.server import NatsServer
from sidecar.server import Sidecar

HERE = Path(__file__).parent
WIRED = "telemetry" in Sidecar.__init__.__code__.co_names
pytestmark = pytest.mark.skipif(
    not WIRED, reason="the sidecar does not call SidecarTelemetry yet (docs/telemetry.md)"
)
REQUESTS = 20


def failing(i: int) -> bool:
    return i % 4 == 0  # 5 of 20: the db app answers 503, passed back up the chain


async def test_three_service_chain_counts_traces_and_logs(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    async with (
        process(
            [*MESH, "controlplane", "--nats", url, "--replica", "cp-1", "--ready-line"],
            env={
                "MESH_METRICS_PORT": "0",
                "MESH_DASHBOARD_PORT": "off",
                "MESH_CA_SECRET": "s" * 32,
            },
        ) as cp,
        AsyncExitStack() as stack,
    ):
        await read_json_line(cp, "event")
        apps: dict[str, Any] = {}
        sidecars: dict[str, dict[str, Any]] = {}
        next_of = {"frontend": "backend", "backend": "db", "db": ""}
        for svc in ("db", "backend", "frontend"):  # each needs the next one's inbound port
            out_file = tmp_path / f"{svc}.outbound"
            argv = [sys.executable, str(HERE / "chain_app.py"), "--name", svc]
            if next_of[svc]:
                argv += ["--next", next_of[svc], "--outbound-file", str(out_file)]
            app = await stack.enter_async_context(process(argv))
            apps[svc] = (await read_json_line(app, "port"))["port"]
            snap: dict[str, Any] = {"version": "7"}
            if next_of[svc]:
                nxt = next_of[svc]
                snap["services"] = [{"name": nxt, "routes": [{}]}]
                snap["clusters"] = [
                    {"name": nxt, "subsets": {"v1": [f"127.0.0.1:{sidecars[nxt]['inbound']}"]}}
                ]
            path = tmp_path / f"{svc}.yaml"
            path.write_text(yaml.safe_dump(snap))
            sc = await stack.enter_async_context(
                process(
                    [
                        *MESH,
                        "sidecar",
                        "--service",
                        svc,
                        "--version",
                        "v1",
                        "--app-port",
                        str(apps[svc]),
                        "--config",
                        str(path),
                        "--outbound-port",
                        "0",
                        "--inbound-port",
                        "0",
                        "--admin-port",
                        "0",
                        "--telemetry-nats",
                        url,
                        "--telemetry-interval",
                        "0.2",
                        "--instance",
                        f"{svc}-1",
                        "--trace-sample",
                        "1.0",
                        "--access-log",
                        str(tmp_path / f"{svc}.log"),
                    ]
                )
            )
            sidecars[svc] = await read_json_line(sc, "event")
            out_file.write_text(str(sidecars[svc]["outbound"]))
        for i in range(REQUESTS):
            status, _ = await http_get(
                sidecars["frontend"]["inbound"],
                "/chain/fail" if failing(i) else "/chain/ok",
                authority="frontend",
            )
            assert status == (503 if failing(i) else 200)

        # The frontend sidecar's /metrics: its outbound pair, by code.
        pair = {
            "source_service": "frontend",
            "destination_service": "backend",
            "destination_version": "v1",
        }
        _, body = await http_get(sidecars["frontend"]["admin"], "/metrics")
        text = body.decode()
        req = "mesh_requests_total"
        assert sample(text, req, **pair, response_code="200", response_flags="") == 15
        assert sample(text, req, **pair, response_code="503", response_flags="") == 5
        assert sample(text, "mesh_request_duration_seconds_count", **pair) == REQUESTS
        assert sample(text, "mesh_config_info", version="7") == 1

        # The aggregator, through `mesh top --once --json`: every pair counted once.
        want = {("unknown", "frontend"), ("frontend", "backend"), ("backend", "db")}
        with trio.fail_after(20):
            while True:
                out = await mesh("top", "--nats", url, "--once", "--json", "--window", "1m")
                snapshot = json.loads(out.stdout)
                edges = {(e["src"], e["dst"]): e for e in snapshot["edges"]}
                if set(edges) == want and all(e["requests"] == REQUESTS for e in edges.values()):
                    break
                await trio.sleep(0.2)
        for e in edges.values():
            assert e["error_rate"] == 0.25 and e["p99_ms"] is not None

        # One trace: 5 spans (frontend in/out, backend in/out, db in), parent -> child.
        with trio.fail_after(5):
            while not (tmp_path / "db.log").read_text():
                await trio.sleep(0.05)
        lines = [json.loads(x) for x in (tmp_path / "db.log").read_text().splitlines()]
        trace_id = lines[0]["trace_id"]
        with trio.fail_after(20):
            while True:
                out = await mesh("trace", "--nats", url, trace_id, "--json")
                spans = json.loads(out.stdout)["spans"] if out.returncode == 0 else []
                if len(spans) == 5:
                    break
                await trio.sleep(0.2)
        assert {s["trace_id"] for s in spans} == {trace_id}
        by_id = {s["span_id"]: s for s in spans}
        roots = [s for s in spans if s["parent_id"] not in by_id]
        assert len(roots) == 1 and roots[0]["service"] == "frontend"
        chain = [roots[0]]
        while len(chain) < 5:
            children = [s for s in spans if s["parent_id"] == chain[-1]["span_id"]]
            assert len(children) == 1, (chain, spans)
            chain.append(children[0])
        assert [s["service"] for s in chain] == [
            "frontend",
            "frontend",
            "backend",
            "backend",
            "db",
        ]

        # Access logs: JSON lines with the listed fields; a line per sidecar per request.
        expected = {"frontend": 2 * REQUESTS, "backend": 2 * REQUESTS, "db": REQUESTS}
        with trio.fail_after(5):
            for svc, n in expected.items():
                while len((tmp_path / f"{svc}.log").read_text().splitlines()) < n:
                    await trio.sleep(0.1)
        entries = [json.loads(x) for x in (tmp_path / "frontend.log").read_text().splitlines()]
        assert all(
            set(e)
            >= {
                "start_time",
                "method",
                "path",
                "authority",
                "status",
                "response_flags",
                "duration_ms",
                "upstream",
                "source",
                "request_id",
                "trace_id",
                "rx_bytes",
                "tx_bytes",
            }
            for e in entries
        )
        assert sum(1 for e in entries if e["status"] == 503) == 10  # in + out, 5 each
