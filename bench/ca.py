"""CA benchmark: CSRs signed per second end to end over NATS, next to the pure signing rate.

    .venv/bin/python bench/ca.py [--seconds 5] [--concurrency 64] [--tokens 1000]

Shape, as deployed: an embedded nats-server, the CA in its own `mesh controlplane` process
(leader of the lease), and many identity agents' requests from this process (``--concurrency``
requests in flight). Requests are prebuilt before timing so this process spends little CPU
per request. Two end-to-end figures:

* renewals (the steady state): CSR + current chain + renewal proof -> chain verification,
  proof verification, CSR checks, leaf signing;
* first issue: CSR + join token -> CSR checks, token redeemed with a KV compare-and-set, signing.

Each is reported as requests/s (wall clock), latency p50/p99, and signed per CPU-second of the
CA process (read from /proc: the per-core figure). The same checks without NATS are timed in
this process afterwards (while the CA idles) and printed as the reference, with the ratio.
The machine is shared and noisy (about 30 % between runs): compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

# bench/bus.py shares its name with the `bus` package: drop this folder from the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import trio  # noqa: E402

from bus import subjects  # noqa: E402
from bus.client import Bus, connect  # noqa: E402
from bus.errors import BusTimeout, NoResponders  # noqa: E402
from bus.server import NatsServer, NodeSpec  # noqa: E402
from mesh import pki  # noqa: E402
from mesh.cli.token_cmd import create_token  # noqa: E402
from mesh.messages import CaCommand, CaCommandReply, CsrReply, CsrRequest  # noqa: E402
from mesh.processes import child_kwargs, terminate  # noqa: E402
from mesh.spiffe import SpiffeId  # noqa: E402

TD = "bench.example"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pure_rate(fn: Callable[[], object], seconds: float) -> float:
    for _ in range(20):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            fn()
        n += 50
    return n / (time.perf_counter() - start)


async def wait_leader(bus: Bus) -> CaCommandReply:
    with trio.fail_after(30):
        while True:
            try:
                return await bus.request(
                    subjects.CA_COMMAND, CaCommand("status"), CaCommandReply, timeout=1
                )
            except (NoResponders, BusTimeout):
                await trio.sleep(0.1)


async def drive(
    bus: Bus, requests: list[CsrRequest], concurrency: int, seconds: float | None
) -> tuple[int, float, list[float]]:
    """Send requests (cycling if ``seconds``, else each once); return (ok, wall s, latencies)."""
    latencies: list[float] = []
    ok = 0
    index = 0
    start = trio.current_time()
    deadline = start + seconds if seconds else float("inf")

    async def worker() -> None:
        nonlocal ok, index
        while trio.current_time() < deadline:
            if seconds is None and index >= len(requests):
                return
            req = requests[index % len(requests)]
            index += 1
            t0 = time.perf_counter()
            reply = await bus.request(subjects.CA_SIGN, req, CsrReply, timeout=30)
            latencies.append(time.perf_counter() - t0)
            if not reply.ok:
                raise SystemExit(f"CA refused a bench request: {reply.reason}: {reply.message}")
            ok += 1

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return ok, trio.current_time() - start, sorted(latencies)


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else 0.0


async def main(args: argparse.Namespace) -> None:
    secret = "bench operator secret " + os.urandom(8).hex()
    with tempfile.TemporaryDirectory(prefix="bench-ca-") as tmp:
        async with trio.open_nursery() as nursery:
            nats: NatsServer = await nursery.start(NatsServer(NodeSpec("bench", Path(tmp))).run)
            env = {
                **os.environ,
                "MESH_CA_SECRET": secret,
                "MESH_TRUST_DOMAIN": TD,
                "MESH_CA_LEAF_TTL": "1h",
            }
            ca_proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "mesh", "controlplane", "--nats", nats.url],
                stdout=subprocess.DEVNULL,
                **child_kwargs(env),
            )
            try:
                async with connect(nats.url, name="bench-ca") as bus:
                    await wait_leader(bus)
                    await run_bench(bus, ca_proc.pid, args)
            finally:
                await terminate(ca_proc)
                nursery.cancel_scope.cancel()


async def run_bench(bus: Bus, ca_pid: int, args: argparse.Namespace) -> None:
    conc = args.concurrency
    # Setup (untimed): tokens, keys, CSRs; first certificates for the renewal set.
    idents = [SpiffeId(TD, f"ns{i % 10}", f"sa{i}") for i in range(args.tokens)]
    token_reqs = []
    keys = []
    for ident in idents:
        text, _ = await create_token(bus, ident, ttl=timedelta(hours=1))
        key = pki.generate_key()
        keys.append(key)
        token_reqs.append(CsrRequest(ident.uri, pki.build_csr(key, ident), token=text))

    cpu0 = cpu_seconds(ca_pid)
    n_tok, wall_tok, lat_tok = await drive(bus, token_reqs, conc, None)
    cpu_tok = cpu_seconds(ca_pid) - cpu0

    # Renewal requests from the certificates just issued (reused: a renewal is stateless).
    renew_reqs = []
    svids = []
    for req, key in zip(token_reqs[:200], keys[:200], strict=True):
        reply = await bus.request(subjects.CA_SIGN, req, CsrReply, timeout=10)  # idempotent retry
        svid = pki.Svid(pki.IssuedSvid.from_der(reply.chain), key)
        svids.append(svid)
        new_key = pki.generate_key()
        csr = pki.build_csr(new_key, svid.identity)
        renew_reqs.append(
            CsrRequest(
                svid.identity.uri,
                csr,
                chain=list(svid.issued.chain_der),
                proof=pki.renewal_proof(svid, csr),
            )
        )
    cpu0 = cpu_seconds(ca_pid)
    n_ren, wall_ren, lat_ren = await drive(bus, renew_reqs, conc, args.seconds)
    cpu_ren = cpu_seconds(ca_pid) - cpu0

    # Pure references in this process (the CA process is idle now).
    ca = pki.generate_root(TD)
    pure_csrs = [(pki.build_csr(pki.generate_key(), i), i) for i in idents[:200]]
    pure_svids = []
    for (_der, ident), key in zip(pure_csrs, [pki.generate_key() for _ in pure_csrs], strict=True):
        pure_svids.append(pki.Svid(ca.sign_csr(pki.build_csr(key, ident), ident), key))
    proofs = [
        (s, der, pki.renewal_proof(s, der))
        for s, (der, _) in zip(pure_svids, pure_csrs, strict=True)
    ]
    i = 0

    def sign_only() -> object:
        nonlocal i
        der, ident = pure_csrs[i % len(pure_csrs)]
        i += 1
        return ca.sign_csr(der, ident).chain_der

    def renewal() -> object:
        nonlocal i
        svid, der, proof = proofs[i % len(proofs)]
        i += 1
        pki.verify_renewal(svid.issued.chain, proof, der, ca.bundle, svid.identity)
        return ca.sign_csr(der, svid.identity).chain_der

    pure_sign = pure_rate(sign_only, args.seconds / 2)
    pure_renew = pure_rate(renewal, args.seconds / 2)

    r_ren, r_tok = n_ren / wall_ren, n_tok / wall_tok
    print(
        f"# CA bench: CA in its own process, {conc} requests in flight from one process, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"renewal over NATS    {r_ren:8.0f} /s  p50 {pct(lat_ren, 0.5):6.2f} ms  "
        f"p99 {pct(lat_ren, 0.99):6.2f} ms  CA CPU {cpu_ren / wall_ren:4.2f} cores  "
        f"-> {n_ren / max(cpu_ren, 1e-9):6.0f} per CA CPU-second"
    )
    print(
        f"first issue (token)  {r_tok:8.0f} /s  p50 {pct(lat_tok, 0.5):6.2f} ms  "
        f"p99 {pct(lat_tok, 0.99):6.2f} ms  CA CPU {cpu_tok / wall_tok:4.2f} cores  "
        f"-> {n_tok / max(cpu_tok, 1e-9):6.0f} per CA CPU-second  ({n_tok} tokens)"
    )
    print(f"pure sign_csr                 {pure_sign:8.0f} /s (this process, one core)")
    print(f"pure renewal check + sign     {pure_renew:8.0f} /s (this process, one core)")
    print(
        f"ratio renewal over NATS / pure renewal: {r_ren / pure_renew:.2f} wall, "
        f"{n_ren / max(cpu_ren, 1e-9) / pure_renew:.2f} per CA CPU-second"
    )
    print(
        f"goal >= 2,000 CSRs/s per core: "
        f"{'met' if n_ren / max(cpu_ren, 1e-9) >= 2000 else 'NOT met'} (renewals)"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1000)
    trio.run(main, p.parse_args())
