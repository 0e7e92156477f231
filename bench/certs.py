"""Certificate benchmarks: CSR signing rate, TLS context build time, mTLS handshakes/s.

    .venv/bin/python bench/certs.py [--seconds 3] [--no-pin]

Runs in one process pinned to one CPU (so "per core" is literal), each figure bounded in time.
Every figure is printed next to a reference measured in the same run, as a ratio, because this
machine is noisy (+-30 % between runs, see shared/FACTS.md):

* signing: ``CertificateAuthority.sign_csr`` (CSR parse, key/SAN checks, CSR signature verify,
  leaf build + sign, leaf DER for the bus) vs. the raw floor with ``cryptography`` and no checks
  (prebuilt extensions, one ``CertificateBuilder.sign`` + DER), and vs. ``openssl speed``'s
  ECDSA P-256 sign+verify (the cryptographic floor of a checked signing: one verify, one sign).
* TLS contexts: ``server_context``/``client_context`` (including loading the key through a
  memfd) vs. a bare ``ssl.SSLContext`` loading the same PEM from a regular file.
* handshakes: full mTLS handshakes over loopback with trio.SSLStream, both ends in this process
  (so the figure pays client + server CPU), including the SPIFFE ID checks on both ends, vs. the
  same loop with server-only TLS (no client certificate, no ID checks).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from mesh import pki
from mesh.spiffe import SpiffeId

TD = "bench.example"


def rate(fn: Callable[[], object], seconds: float) -> tuple[float, int]:
    """Calls per second of ``fn`` over about ``seconds`` (after a short warm-up)."""
    for _ in range(20):
        fn()
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn()
        n += 50
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start), n


def bench_signing(seconds: float) -> tuple[float, float]:
    ca = pki.generate_root(TD)
    idents = [SpiffeId(TD, f"ns{i % 10}", f"sa{i}") for i in range(200)]
    csrs = [(pki.build_csr(pki.generate_key(), ident), ident) for ident in idents]
    i = 0

    def checked() -> object:
        nonlocal i
        der, ident = csrs[i % len(csrs)]
        i += 1
        return ca.sign_csr(der, ident).chain_der  # DER: what goes back on the bus

    ours, _ = rate(checked, seconds)

    # Reference: build + sign + DER with everything prebuilt, no parsing and no checks.
    key = ca.key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    pub = pki.generate_key().public_key()
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(idents[0].uri)])
    ku = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    bc = x509.BasicConstraints(ca=False, path_length=None)
    issuer, sha = ca.certificate.subject, hashes.SHA256()
    now = datetime.now(UTC)
    later = now + timedelta(hours=24)

    def raw() -> object:
        return (
            x509.CertificateBuilder(
                issuer_name=issuer,
                subject_name=x509.Name([]),
                public_key=pub,
                serial_number=x509.random_serial_number(),
                not_valid_before=now,
                not_valid_after=later,
            )
            .add_extension(bc, critical=True)
            .add_extension(ku, critical=True)
            .add_extension(eku, critical=False)
            .add_extension(san, critical=True)
            .sign(key, sha)
            .public_bytes(Encoding.DER)
        )

    reference, _ = rate(raw, seconds)
    return ours, reference


def openssl_floor(seconds: float) -> tuple[float, float] | None:
    """(sign/s, verify/s) of ECDSA P-256 from ``openssl speed``, or None if unavailable."""
    exe = shutil.which("openssl")
    if exe is None:
        return None
    secs = str(max(1, round(seconds / 2)))
    try:
        out = subprocess.run(
            [exe, "speed", "-seconds", secs, "ecdsap256"],
            capture_output=True,
            text=True,
            timeout=4 * int(secs) + 20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    m = re.search(r"256 bits ecdsa \(nistp256\)\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)", out)
    return (float(m.group(1)), float(m.group(2))) if m else None


def bench_contexts(seconds: float) -> tuple[float, float, float]:
    ca = pki.generate_root(TD)
    ident = SpiffeId(TD, "shop", "checkout")
    key = pki.generate_key()
    svid = pki.Svid(ca.sign_csr(pki.build_csr(key, ident), ident), key)
    per = seconds / 3
    server, _ = rate(lambda: pki.server_context(svid, ca.bundle), per)
    client, _ = rate(lambda: pki.client_context(svid, ca.bundle), per)
    # Reference: what the stdlib does from a PEM file already on disk.
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "svid.pem")
        with open(path, "wb") as f:
            f.write(svid.issued.chain_pem + svid.key_pem())
        cadata = ca.bundle.pem.decode()

        def bare() -> object:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_verify_locations(cadata=cadata)
            ctx.load_cert_chain(path)
            return ctx

        ref, _ = rate(bare, per)
    return 1e3 / server, 1e3 / client, 1e3 / ref


async def _handshakes(seconds: float, mutual: bool) -> float:
    ca = pki.generate_root(TD)
    srv_id, cli_id = SpiffeId(TD, "shop", "inventory"), SpiffeId(TD, "shop", "checkout")
    ks, kc = pki.generate_key(), pki.generate_key()
    srv = pki.Svid(ca.sign_csr(pki.build_csr(ks, srv_id), srv_id), ks)
    cli = pki.Svid(ca.sign_csr(pki.build_csr(kc, cli_id), cli_id), kc)
    sctx = pki.server_context(srv, ca.bundle, require_client_cert=mutual)
    if mutual:
        cctx = pki.client_context(cli, ca.bundle)
    else:
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.check_hostname = False
        cctx.minimum_version = ssl.TLSVersion.TLSv1_3
        cctx.load_verify_locations(cadata=ca.bundle.pem.decode())

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, sctx, server_side=True)
        try:
            if mutual:
                await pki.handshake_and_check(stream, trust_domain=TD)
            else:
                await stream.do_handshake()
            await stream.send_all(b"k")
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    count = 0
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            stream = trio.SSLStream(tcp, cctx, server_hostname=None)
            if mutual:
                await pki.handshake_and_check(stream, trust_domain=TD, expected=srv_id)
            else:
                await stream.do_handshake()
            await stream.receive_some(1)  # the server has finished its side too
            await trio.aclose_forcefully(stream)
            count += 1
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return count / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="time per figure")
    ap.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    args = ap.parse_args()
    pinned = "not pinned"
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        pinned = f"pinned to CPU {cpu}"
    s = args.seconds
    print(f"# certs bench: {s:g} s per figure, one process {pinned}, {ssl.OPENSSL_VERSION}")

    ours, ref = bench_signing(s)
    print(f"CSR sign, checked (sign_csr + DER)   {ours:9.0f} /s")
    print(f"  ref: raw build+sign+DER, no checks {ref:9.0f} /s   ratio {ours / ref:.2f}")
    floor = openssl_floor(s)
    if floor is not None:
        sign, verify = floor
        both = 1 / (1 / sign + 1 / verify)
        print(
            f"  ref: openssl speed P-256 sign {sign:.0f}/s, verify {verify:.0f}/s -> "
            f"sign+verify floor {both:.0f}/s   ratio {ours / both:.2f}"
        )
    goal = "met" if ours >= 2000 else "NOT met"
    print(f"  goal >= 2,000/s per core: {goal}")

    srv_ms, cli_ms, ref_ms = bench_contexts(s)
    print(f"TLS server context build             {srv_ms:9.3f} ms")
    print(f"TLS client context build             {cli_ms:9.3f} ms")
    print(f"  ref: bare SSLContext from PEM file {ref_ms:9.3f} ms   ratio {srv_ms / ref_ms:.2f}")

    mtls = trio.run(_handshakes, s, True)
    tls = trio.run(_handshakes, s, False)
    print(f"mTLS handshakes, loopback, +ID checks{mtls:9.0f} /s (client+server CPU, one core)")
    print(f"  ref: server-only TLS handshakes    {tls:9.0f} /s   ratio {mtls / tls:.2f}")


if __name__ == "__main__":
    main()
