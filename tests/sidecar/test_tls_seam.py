"""The TLS seam the identity issue will use: sidecar-to-sidecar over TLS, app in plaintext.

Two Sidecar objects run in this trio test (real sockets, a real app process); the
certificate is a throwaway self-signed one for 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sidecar_helpers import Procs

from mesh.snapshot import Snapshot
from sidecar.server import Sidecar, SidecarOptions


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test sidecar")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def _get(port: int, host: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /anything HTTP/1.1\r\nhost: %b\r\nconnection: close\r\n\r\n"
                              % host)
        out = b""
        with trio.fail_after(5):
            while data := await stream.receive_some(65536):
                out += data
        return out


async def test_sidecars_talk_tls_to_each_other(procs: Procs, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    app_port = procs.app("reviews-app")
    snap_file = tmp_path / "unused.yaml"
    snap_file.write_text("version: '1'\n")

    def opts(service: str, app: int) -> SidecarOptions:
        return SidecarOptions(service=service, version="v1", app_port=app, config=snap_file,
                              outbound_port=0, inbound_port=0, admin_port=0,
                              watch_interval=3600)

    server = Sidecar(opts("reviews", app_port), Snapshot.from_dict({"version": "1"}),
                     inbound_ssl=server_ctx)
    async with trio.open_nursery() as nursery:
        server_ports = await nursery.start(server.run)
        client = Sidecar(opts("productpage", 1), Snapshot.from_dict({
            "version": "1",
            "services": [{"name": "reviews", "routes": [{}]}],
            "clusters": [{"name": "reviews", "subsets": {
                "v1": [f"127.0.0.1:{server_ports['inbound']}"]}}],
        }), upstream_ssl=client_ctx)
        client_ports = await nursery.start(client.run)

        reply = await _get(client_ports["outbound"], b"reviews")
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
        assert b'"name": "reviews-app"' in reply
        assert client.pool.opened == 1 and server.app_pool.opened == 1

        # The inbound listener now speaks TLS only: plaintext gets no HTTP answer.
        assert not (await _get(server_ports["inbound"], b"reviews")).startswith(b"HTTP/")
        nursery.cancel_scope.cancel()
