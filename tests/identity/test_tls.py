"""Real mutual TLS over loopback with contexts from mesh.pki_tls (trio SSLStreams)."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta

import pytest
import trio
from pki_helpers import NOW, forge_self_signed, issue

from mesh import pki
from mesh.spiffe import SpiffeId


async def _serve_once(
    server_ctx: ssl.SSLContext,
    trust_domain: str,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> SpiffeId | BaseException:
    """Accept one connection, handshake, read the client's SPIFFE ID, echo it back."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    task_status.started(port)
    tcp = await listeners[0].accept()
    for listener in listeners:
        await listener.aclose()
    stream = trio.SSLStream(tcp, server_ctx, server_side=True)
    try:
        ident = await pki.handshake_and_check(stream, trust_domain=trust_domain)
        await stream.send_all(ident.uri.encode())
        await stream.aclose()
        return ident
    except (trio.BrokenResourceError, pki.CertificateRefused) as exc:
        await trio.aclose_forcefully(stream)
        return exc


async def _run(
    server: pki.Svid,
    client: pki.Svid,
    bundle: pki.TrustBundle,
    *,
    expect_server: SpiffeId | None,
) -> tuple[SpiffeId | BaseException, bytes | BaseException]:
    result: dict[str, SpiffeId | BaseException] = {}

    async def server_task(task_status: trio.TaskStatus[int]) -> None:
        result["server"] = await _serve_once(
            pki.server_context(server, bundle), bundle.trust_domain, task_status=task_status
        )

    client_got: bytes | BaseException
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server_task)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            stream = trio.SSLStream(tcp, pki.client_context(client, bundle), server_hostname=None)
            try:
                await pki.handshake_and_check(
                    stream, trust_domain=bundle.trust_domain, expected=expect_server
                )
                client_got = b""
                while chunk := await stream.receive_some(4096):
                    client_got += chunk
            except (trio.BrokenResourceError, pki.CertificateRefused) as exc:
                client_got = exc
            await trio.aclose_forcefully(stream)
    return result["server"], client_got


async def test_mutual_tls_server_sees_client_spiffe_id(
    ca: pki.CertificateAuthority, checkout: SpiffeId, inventory: SpiffeId
) -> None:
    server, client = issue(ca, inventory), issue(ca, checkout)
    seen, got = await _run(server, client, ca.bundle, expect_server=inventory)
    assert seen == checkout
    assert got == checkout.uri.encode()


async def test_client_with_forged_cert_refused_at_handshake(
    ca: pki.CertificateAuthority, checkout: SpiffeId, inventory: SpiffeId
) -> None:
    server = issue(ca, inventory)
    forged = forge_self_signed(checkout)  # copies checkout's SPIFFE URI, self-signed
    seen, got = await _run(server, forged, ca.bundle, expect_server=inventory)
    assert isinstance(seen, trio.BrokenResourceError)
    assert "certificate" in repr(seen.__cause__).lower()  # OpenSSL: unknown/bad certificate
    assert isinstance(got, trio.BrokenResourceError)  # TLS 1.3: the client learns on read
    flag = pki.classify_tls_failure(seen)
    assert isinstance(flag, pki.UnknownIssuer) and "self-signed" in str(flag)


async def test_client_with_expired_cert_refused(
    ca: pki.CertificateAuthority, checkout: SpiffeId, inventory: SpiffeId
) -> None:
    server = issue(ca, inventory)
    expired = issue(ca, checkout, ttl=timedelta(hours=1), now=NOW - timedelta(days=2))
    seen, _ = await _run(server, expired, ca.bundle, expect_server=inventory)
    assert isinstance(seen, trio.BrokenResourceError)
    assert "expired" in repr(seen.__cause__)
    assert isinstance(pki.classify_tls_failure(seen), pki.CertExpired)


async def test_client_refuses_valid_server_of_the_wrong_service(
    ca: pki.CertificateAuthority, checkout: SpiffeId, inventory: SpiffeId
) -> None:
    reviews = SpiffeId(checkout.trust_domain, "shop", "reviews")
    server, client = issue(ca, reviews), issue(ca, checkout)
    _, got = await _run(server, client, ca.bundle, expect_server=inventory)
    assert isinstance(got, pki.WrongIdentity)
    assert "expected spiffe://example.org/ns/shop/sa/inventory" in str(got)


async def test_client_trusting_other_root_refuses_server(
    ca: pki.CertificateAuthority, checkout: SpiffeId, inventory: SpiffeId
) -> None:
    stranger = pki.generate_root(ca.trust_domain)
    server = issue(stranger, inventory)
    client = issue(ca, checkout)
    # The server trusts both roots (it would accept the client); the client trusts only ca.
    overlap = ca.bundle.with_root(stranger.certificate)
    result: list[BaseException] = []
    async with trio.open_nursery() as nursery:

        async def srv(task_status: trio.TaskStatus[int]) -> None:
            r = await _serve_once(
                pki.server_context(server, overlap), ca.trust_domain, task_status=task_status
            )
            assert isinstance(r, BaseException)

        port = await nursery.start(srv)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, pki.client_context(client, ca.bundle), server_hostname=None)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            result.append(exc)
        await trio.aclose_forcefully(stream)
    assert result and "certificate verify failed" in repr(result[0].__cause__)
    assert isinstance(pki.classify_tls_failure(result[0]), pki.UnknownIssuer)


async def test_rotation_overlap_both_roots_interoperate(
    checkout: SpiffeId, inventory: SpiffeId
) -> None:
    old = pki.generate_root(checkout.trust_domain)
    new = pki.generate_root(checkout.trust_domain)
    overlap = old.bundle.with_root(new.certificate)
    # Server already re-issued by the new root, client still on the old one.
    seen, got = await _run(
        issue(new, inventory), issue(old, checkout), overlap, expect_server=inventory
    )
    assert seen == checkout and got == checkout.uri.encode()


@pytest.mark.parametrize("fallback", [False, True])
def test_context_builds_without_key_on_disk(
    ca: pki.CertificateAuthority,
    checkout: SpiffeId,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: object,
    fallback: bool,
) -> None:
    import os
    import tempfile

    if fallback:  # exercise the non-Linux path: a 0700 temp dir, removed right away
        monkeypatch.delattr(os, "memfd_create", raising=False)
    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def spy(*a: str, **kw: str) -> str:
        d = real_mkdtemp(*a, **kw)
        made.append(d)
        assert os.stat(d).st_mode & 0o777 == 0o700
        return d

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    ctx = pki.server_context(issue(ca, checkout), ca.bundle)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert bool(made) == fallback
    assert all(not os.path.exists(d) for d in made)


async def test_client_without_certificate_refused_in_strict_mode(
    ca: pki.CertificateAuthority, inventory: SpiffeId
) -> None:
    server = issue(ca, inventory)
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=ca.bundle.pem.decode())
    result: dict[str, SpiffeId | BaseException] = {}
    async with trio.open_nursery() as nursery:

        async def srv(task_status: trio.TaskStatus[int]) -> None:
            result["server"] = await _serve_once(
                pki.server_context(server, ca.bundle), ca.trust_domain, task_status=task_status
            )

        port = await nursery.start(srv)
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, anonymous, server_hostname=None)
        with pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()
            await stream.receive_some(10)
        await trio.aclose_forcefully(stream)
    seen = result["server"]
    assert isinstance(seen, trio.BrokenResourceError)
    assert isinstance(pki.classify_tls_failure(seen), pki.NotAnSvid)


async def test_not_yet_valid_client_refused(
    ca: pki.CertificateAuthority, checkout: SpiffeId, inventory: SpiffeId
) -> None:
    future = issue(ca, checkout, now=datetime.now(UTC) + timedelta(hours=2))
    seen, _ = await _run(issue(ca, inventory), future, ca.bundle, expect_server=inventory)
    assert isinstance(seen, trio.BrokenResourceError)
    assert isinstance(pki.classify_tls_failure(seen), pki.CertNotYetValid)


async def test_trusted_chain_but_foreign_trust_domain_refused_after_handshake(
    ca: pki.CertificateAuthority, inventory: SpiffeId
) -> None:
    # OpenSSL accepts the chain (our root signed it), only the SPIFFE check can refuse it:
    # this is why both ends must call check_peer_leaf / handshake_and_check.
    foreign = SpiffeId("other.org", "shop", "checkout")
    key = pki.generate_key()
    svid = pki.Svid(ca.issue(foreign, key.public_key()), key)
    seen, _ = await _run(issue(ca, inventory), svid, ca.bundle, expect_server=inventory)
    assert isinstance(seen, pki.WrongTrustDomain)
    assert pki.classify_tls_failure(seen) is seen
