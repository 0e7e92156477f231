"""Opaque TCP throughput through the mesh: direct vs two sidecars in plaintext vs over mTLS.

    .venv/bin/python bench/tcp.py [--mb 64] [--rounds 3]

One echo app (tests/sidecar/tcp_echo_app.py), and per path one connection that streams
`--mb` MB in 64 kB writes while reading the echo back; the figure is payload MB/s (each
byte crosses every hop twice, once each way). Paths, alternating per round, median printed:

- direct:    client -> app
- plaintext: client -> caller sidecar (TCP listener) -> stock sidecar (inbound.tcp) -> app
- mTLS:      the same with SPIFFE certificates from a real CA actor on a real nats-server,
             STRICT on the stock sidecar, the caller checking stock's identity.

Every process is started here and stopped at the end; loops are bounded by size and time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

# bench/ holds bus.py, which would shadow the `bus` package: drop this folder from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import trio  # noqa: E402
import yaml  # noqa: E402

from actors.ca import CaActor  # noqa: E402
from actors.ca_config import CaConfig  # noqa: E402
from actors.runtime import ActorContext  # noqa: E402
from bus.client import connect  # noqa: E402
from bus.server import NatsServer, NodeSpec  # noqa: E402
from mesh.cli.token_cmd import create_token  # noqa: E402
from mesh.processes import terminate_all  # noqa: E402
from mesh.spiffe import SpiffeId  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "tests" / "sidecar" / "tcp_echo_app.py"
MESH = [sys.executable, "-m", "mesh"]
TD = "bench.mesh"
CHUNK = 65536


async def spawn(procs: list[trio.Process], argv: list[str], tmp: Path) -> dict[str, Any]:
    with (tmp / f"p{len(procs)}.err").open("wb") as err:
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=err,
                                                cwd=ROOT)
    procs.append(proc)
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(30):
        while b"\n" not in buf:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"{argv[:5]} exited: {(tmp / f'p{len(procs) - 1}.err').read_text()}")
            buf += chunk
    info: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
    return info


async def sidecar(procs: list[trio.Process], tmp: Path, service: str, app_port: int,
                  snap: dict[str, Any], *extra: str) -> dict[str, Any]:
    path = tmp / f"{service}-{len(procs)}.yaml"
    path.write_text(yaml.safe_dump(snap))
    return await spawn(procs, [*MESH, "sidecar", "--service", service, "--app-port", str(app_port),
                               "--config", str(path), "--outbound-port", "0", "--inbound-port", "0",
                               "--admin-port", "0", *extra], tmp)


def caller_snap(stock_inbound: int) -> dict[str, Any]:
    return {"version": "1",
            "clusters": [{"name": "stock", "subsets": {"v1": [f"127.0.0.1:{stock_inbound}"]}}],
            "tcp": [{"name": "stock", "port": 0, "cluster": "stock", "subset": "v1"}]}


async def stream_through(port: int, total: int) -> float:
    """Payload MB/s of `total` bytes sent and echoed back on one connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = b"\xa5" * CHUNK
    start = time.perf_counter()
    async with stream:
        async def send() -> None:
            for _ in range(total // CHUNK):
                await stream.send_all(data)

        async def receive() -> None:
            got = 0
            while got < total:
                chunk = await stream.receive_some(1 << 20)
                if not chunk:
                    raise RuntimeError(f"closed after {got} of {total} bytes")
                got += len(chunk)

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                nursery.start_soon(receive)
    return total / 1e6 / (time.perf_counter() - start)


async def main(mb: int, rounds: int) -> None:
    total = mb * 1_000_000 // CHUNK * CHUNK
    procs: list[trio.Process] = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        async with trio.open_nursery() as nursery:
            server: NatsServer = await nursery.start(NatsServer(NodeSpec("bench", tmp / "nats")).run)
            url = server.url
            try:
                async with connect(url) as bus, trio.open_nursery() as cp:
                    ca = CaActor(CaConfig(secret=b"bench operator secret, 32 bytes.",
                                          trust_domain=TD, leaf_ttl=timedelta(hours=1),
                                          lease_ttl=1.0))
                    await cp.start(ca.run, ActorContext(bus=bus, replica="bench"))
                    with trio.fail_after(20):
                        await ca.leading.wait()

                    async def ident(service: str) -> list[str]:
                        token, _ = await create_token(bus, SpiffeId(TD, "bench", service), uses=1)
                        f = tmp / f"token-{service}"
                        f.write_text(token)
                        return ["--nats", url, "--identity", f"spiffe://{TD}/ns/bench/sa/{service}",
                                "--token-file", str(f), "--mtls", "STRICT"]

                    app = int((await spawn(procs, [sys.executable, str(ECHO)], tmp))["port"])
                    inbound_tcp = {"version": "1", "inbound": {"tcp": {}}}
                    plain_stock = await sidecar(procs, tmp, "stock", app, inbound_tcp)
                    plain_caller = await sidecar(procs, tmp, "catalog", 9,
                                                 caller_snap(plain_stock["inbound"]))
                    tls_stock = await sidecar(procs, tmp, "stock", app, inbound_tcp,
                                              *await ident("stock"))
                    tls_caller = await sidecar(procs, tmp, "catalog", 9,
                                               caller_snap(tls_stock["inbound"]),
                                               *await ident("catalog"))
                    paths = {"direct": app, "plaintext": plain_caller["tcp"]["stock"],
                             "mTLS": tls_caller["tcp"]["stock"]}
                    results: dict[str, list[float]] = {k: [] for k in paths}
                    for _ in range(rounds):
                        for name, port in paths.items():
                            results[name].append(await stream_through(port, total))
                    cp.cancel_scope.cancel()
            finally:
                await terminate_all(procs)
                nursery.cancel_scope.cancel()
    direct = statistics.median(results["direct"])
    print(f"opaque TCP: {total / 1e6:.0f} MB echoed on one connection, median of {rounds} "
          "rounds, payload MB/s (each byte crosses each hop both ways)")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"  {name:<10} {med:8.1f} MB/s   {med / direct:5.2f}x direct   "
              f"(rounds: {', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    trio.run(main, args.mb, args.rounds)
