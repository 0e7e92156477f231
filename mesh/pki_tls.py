"""``ssl.SSLContext`` for mTLS between sidecars, built from an in-memory SVID.

Getting the key into OpenSSL: ``SSLContext.load_cert_chain`` only takes a file path, and the
stdlib has no in-memory variant. In order of preference:

1. Linux ``memfd_create``: an anonymous in-memory file, opened by OpenSSL through
   ``/proc/self/fd/N``. It has no name in any filesystem, is never written to disk, cannot be
   opened by another process without ptrace rights over ours, and disappears at ``close``.
2. Elsewhere: a file created with ``O_EXCL | O_NOFOLLOW`` and mode 0600 inside a fresh
   ``mkdtemp`` directory (mode 0700, so no other user can even list it), removed together with
   the directory in a ``finally`` right after loading.

In both cases the key PEM exists outside Python objects only for the duration of the load. The
trust bundle needs no file: ``load_verify_locations(cadata=...)`` takes PEM text.

Identity checks: OpenSSL verifies the chain to the bundle and the dates, but Python's ``ssl``
cannot match URI SANs, so hostname checking is off and **callers must call**
``check_peer_leaf(stream.getpeercert(binary_form=True), ...)`` (or ``handshake_and_check``)
after the handshake and before sending or accepting any application byte. With TLS 1.3 a client
finishes its handshake before the server has judged the client certificate; a refused client
sees the failure on its first read or write.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from datetime import datetime
from typing import TypeVar

import trio

from mesh.pki_bundle import TrustBundle
from mesh.pki_errors import (
    BadChain,
    CertExpired,
    CertificateRefused,
    CertNotYetValid,
    NotAnSvid,
    UnknownIssuer,
)
from mesh.pki_svid import Svid
from mesh.pki_verify import check_peer_leaf
from mesh.spiffe import SpiffeId

__all__ = [
    "classify_tls_failure",
    "client_context",
    "handshake_and_check",
    "load_svid_into",
    "server_context",
]

_S = TypeVar("_S", bound=trio.abc.Stream)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def load_svid_into(ctx: ssl.SSLContext, svid: Svid) -> None:
    """Load ``svid``'s chain and key into ``ctx`` without the key touching a disk."""
    pem = svid.issued.chain_pem + svid.key_pem()
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd_create("trio-mesh-svid", getattr(os, "MFD_CLOEXEC", 1))
        try:
            _write_all(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    tmpdir = tempfile.mkdtemp(prefix="trio-mesh-svid-")  # created 0700
    path = os.path.join(tmpdir, "svid.pem")
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags, 0o600)
        try:
            _write_all(fd, pem)
        finally:
            os.close(fd)
        ctx.load_cert_chain(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rmdir(tmpdir)


def _base(ctx: ssl.SSLContext, svid: Svid, bundle: TrustBundle, min_tls: ssl.TLSVersion) -> None:
    ctx.minimum_version = min_tls
    ctx.load_verify_locations(cadata=bundle.pem.decode("ascii"))
    load_svid_into(ctx, svid)


def server_context(
    svid: Svid,
    bundle: TrustBundle,
    *,
    require_client_cert: bool = True,
    min_tls: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    """Inbound context. ``require_client_cert=True`` is STRICT mTLS: a client without a
    certificate chaining to ``bundle`` fails the handshake. False (PERMISSIVE) asks for one
    but lets the connection through without; ``getpeercert`` then returns None."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _base(ctx, svid, bundle, min_tls)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    # Sidecar clients pool connections and never resume sessions; issuing TLS 1.3 tickets
    # would cost two encryptions and a round of bytes per handshake for nothing.
    ctx.num_tickets = 0
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def client_context(
    svid: Svid,
    bundle: TrustBundle,
    *,
    min_tls: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    """Outbound context: presents ``svid``, verifies the server chain against ``bundle``.

    Hostname checking is off because identities are URI SANs; check the server's SPIFFE ID
    with ``check_peer_leaf``/``handshake_and_check`` (connect with ``server_hostname=None``).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    _base(ctx, svid, bundle, min_tls)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def handshake_and_check(
    stream: trio.SSLStream[_S],
    *,
    trust_domain: str,
    expected: SpiffeId | None = None,
    now: datetime | None = None,
) -> SpiffeId:
    """Complete the handshake and return the peer's SPIFFE ID (``expected`` if given).

    TLS failures surface as ``trio.BrokenResourceError`` from trio; identity refusals as
    ``CertificateRefused`` subclasses. The caller closes the stream on either.
    """
    await stream.do_handshake()
    return check_peer_leaf(
        stream.getpeercert(binary_form=True),
        trust_domain=trust_domain,
        expected=expected,
        now=now,
    )


# OpenSSL X509_V_ERR_* codes -> our refusal classes, so a handshake refused by OpenSSL is logged
# with the same flag as one refused by ``verify_svid``.
_VERIFY_CODES: dict[int, type[CertificateRefused]] = {
    2: UnknownIssuer,  # UNABLE_TO_GET_ISSUER_CERT
    7: UnknownIssuer,  # CERT_SIGNATURE_FAILURE (forged)
    9: CertNotYetValid,  # CERT_NOT_YET_VALID
    10: CertExpired,  # CERT_HAS_EXPIRED
    18: UnknownIssuer,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: UnknownIssuer,  # SELF_SIGNED_CERT_IN_CHAIN
    20: UnknownIssuer,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: UnknownIssuer,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    24: BadChain,  # INVALID_CA
    25: BadChain,  # PATH_LENGTH_EXCEEDED
    26: NotAnSvid,  # INVALID_PURPOSE (no clientAuth/serverAuth EKU)
}


def classify_tls_failure(exc: BaseException) -> CertificateRefused | None:
    """Map a failed handshake (e.g. ``trio.BrokenResourceError`` whose cause is an
    ``ssl.SSLCertVerificationError``) to the typed refusal, for the log flag and metrics.

    Returns None when the failure is not about the peer's certificate (a reset, a timeout).
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, CertificateRefused):
            return cur
        if isinstance(cur, ssl.SSLCertVerificationError):
            cls = _VERIFY_CODES.get(cur.verify_code, CertificateRefused)
            return cls(f"peer certificate refused by TLS: {cur.verify_message}")
        if isinstance(cur, ssl.SSLError) and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(cur):
            return NotAnSvid("peer presented no client certificate (STRICT mTLS requires one)")
        cur = cur.__cause__ or cur.__context__
    return None
