"""HTTP/1.1 framing and abuse against a real sidecar's inbound listener (-> real app)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sidecar_helpers import Procs, Sidecar, raw_exchange, request, snapshot

LIMITS = {"max_header_bytes": 2048, "max_body_bytes": 1_000_000, "header_timeout": 0.5,
          "idle_timeout": 1.0, "stream_timeout": 1.0}


@pytest.fixture(scope="module")
def side(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    procs = Procs(Path(tmp_path_factory.mktemp("proto")))
    try:
        app = procs.app("app")
        yield procs.sidecar("app", "v1", app, snapshot(limits=LIMITS))
    finally:
        procs.close()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    procs = Procs(Path(tmp_path_factory.mktemp("big")))
    try:
        app = procs.app("app")
        yield procs.sidecar("app", "v1", app, snapshot())
    finally:
        procs.close()


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def _header(reply: bytes, name: bytes) -> bytes | None:
    head = reply.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == name:
            return v.strip()
    return None


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nhost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: a\r\ncontent-length: x\r\n\r\n",
    b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
])
def test_malformed_request_gets_400_and_close(side: Sidecar, data: bytes) -> None:
    reply = raw_exchange(side.inbound, data)  # returns only once the sidecar closes
    assert _status(reply) == 400
    assert _header(reply, b"x-mesh-flags") == b"DPE"
    assert _header(reply, b"connection") == b"close"


def test_header_block_over_limit_gets_431(side: Sidecar) -> None:
    data = b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 4000 + b"\r\n\r\n"
    assert _status(raw_exchange(side.inbound, data)) == 431
    # Also when the oversized head trickles in without ever ending.
    with socket.create_connection(("127.0.0.1", side.inbound), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n")
        for _ in range(10):
            try:
                s.sendall(b"x-h: " + b"b" * 500 + b"\r\n")
            except OSError:
                break
        assert _status(s.recv(65536)) == 431


def test_body_over_limit_gets_413(side: Sidecar) -> None:
    reply = raw_exchange(side.inbound, b"POST /count HTTP/1.1\r\nhost: a\r\n"
                         b"content-length: 2000000\r\n\r\n")
    assert _status(reply) == 413
    chunked = b"POST /count HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n" + (
        b"10000\r\n" + b"a" * 0x10000 + b"\r\n") * 20 + b"0\r\n\r\n"
    assert _status(raw_exchange(side.inbound, chunked)) == 413


def test_invalid_chunked_encoding_gets_400(side: Sidecar) -> None:
    data = (b"POST /count HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
            b"zz\r\nhello\r\n0\r\n\r\n")
    assert _status(raw_exchange(side.inbound, data)) == 400


def test_slow_client_header_timeout(side: Sidecar) -> None:
    t0 = time.monotonic()
    reply = raw_exchange(side.inbound, b"GET / HTTP/1.1\r\nhost: a\r\n", timeout=5)
    assert _status(reply) == 408
    assert _header(reply, b"x-mesh-flags") == b"DT"
    assert time.monotonic() - t0 < 4.5  # the 0.5 s limit, not our 5 s read timeout


def test_slow_client_body_timeout(side: Sidecar) -> None:
    reply = raw_exchange(side.inbound, b"POST /count HTTP/1.1\r\nhost: a\r\n"
                         b"content-length: 10\r\n\r\nhalf.", timeout=5)
    assert _status(reply) == 408
    assert _header(reply, b"x-mesh-reason") == b"request body read timeout"


def test_upstream_garbage_gets_502(side: Sidecar) -> None:
    status, headers, _ = request(side.inbound, "/garbage")
    assert status == 502
    assert headers["x-mesh-flags"] == "UPE"


def test_truncated_upstream_body_breaks_the_client_message(side: Sidecar) -> None:
    with pytest.raises(http.client.IncompleteRead):
        request(side.inbound, "/truncate")
    assert request(side.inbound, "/anything")[0] == 200  # and the sidecar is fine


def test_stale_pooled_connection_is_retried_on_a_fresh_one(side: Sidecar) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", side.inbound, timeout=5)
    try:
        opened_before = _upstream_connections(side)
        for _ in range(10):  # each reuses the connection the app has just closed
            assert request(side.inbound, "/close-after", conn=conn)[0] == 200
        # The stale connections were really reused first, then replaced.
        assert _upstream_connections(side) - opened_before >= 9
    finally:
        conn.close()


def _upstream_connections(side: Sidecar) -> float:
    _, metrics = side.admin_get("/metrics")
    line = next(x for x in metrics.decode().splitlines()
                if x.startswith("mesh_sidecar_upstream_connections_total "))
    return float(line.split()[1])


def test_keep_alive_reuses_both_connections(side: Sidecar) -> None:
    opened_before = _upstream_connections(side)
    conn = http.client.HTTPConnection("127.0.0.1", side.inbound, timeout=5)
    try:
        ports = set()
        for _ in range(20):
            status, _, _body = request(side.inbound, "/anything", conn=conn)
            assert status == 200
            ports.add(conn.sock.getsockname()[1])
        assert len(ports) == 1
    finally:
        conn.close()
    # 20 requests did not open 20 upstream connections.
    assert _upstream_connections(side) - opened_before <= 1


def test_pipelined_requests_answered_in_order(side: Sidecar) -> None:
    reqs = b"".join(b"GET /anything?n=%d HTTP/1.1\r\nhost: a\r\n\r\n" % i for i in range(5))
    reqs += b"GET /anything?n=last HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", side.inbound), timeout=5) as s:
        s.sendall(reqs)
        f = s.makefile("rb")
        paths = []
        for _ in range(6):
            assert f.readline().startswith(b"HTTP/1.1 200")
            length = 0
            while (line := f.readline()) != b"\r\n":
                k, _, v = line.partition(b":")
                if k.lower() == b"content-length":
                    length = int(v)
            paths.append(json.loads(f.read(length))["path"])
    assert paths == [*(f"/anything?n={i}" for i in range(5)), "/anything?n=last"]


def test_head_204_304_framing(side: Sidecar) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", side.inbound, timeout=5)
    try:
        status, headers, body = request(side.inbound, "/bytes/1000", method="HEAD", conn=conn)
        assert (status, headers["content-length"], body) == (200, "1000", b"")
        assert request(side.inbound, "/204", conn=conn)[0::2] == (204, b"")
        assert request(side.inbound, "/304", conn=conn)[0::2] == (304, b"")
        # The connection is still in sync after each body-less response.
        status, _, body = request(side.inbound, "/anything", conn=conn)
        assert status == 200 and json.loads(body)["path"] == "/anything"
    finally:
        conn.close()


def test_chunked_and_close_delimited_responses(side: Sidecar) -> None:
    status, headers, body = request(side.inbound, "/bytes/100000?chunked=1")
    assert status == 200 and len(body) == 100000 and headers["transfer-encoding"] == "chunked"
    status, headers, body = request(side.inbound, "/close/5000")
    assert status == 200 and body == b"z" * 5000
    assert headers["transfer-encoding"] == "chunked"  # re-framed for an HTTP/1.1 client


def test_chunked_request_body(side: Sidecar) -> None:
    data = (b"POST /count HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n"
            b"connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    reply = raw_exchange(side.inbound, data)
    assert _status(reply) == 200
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["received"] == 11


def test_websocket_style_upgrade_is_tunnelled(side: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", side.inbound), timeout=5) as s:
        s.sendall(b"GET /echo-upgrade HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\n"
                  b"upgrade: websocket\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert _status(head) == 101
        assert (_header(head, b"upgrade") or b"").lower() == b"websocket"
        for msg in (b"hello", b"\x00\x01binary\xff" * 100):
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += s.recv(65536)
            assert got == msg


def test_expect_100_continue(side: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", side.inbound), timeout=5) as s:
        s.sendall(b"POST /count HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n"
                  b"expect: 100-continue\r\nconnection: close\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"hello")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["received"] == 5


def test_large_bodies_stream_with_bounded_memory(big: Sidecar) -> None:
    size = 200 * 1024 * 1024
    before = big.rss_kb()
    with socket.create_connection(("127.0.0.1", big.inbound), timeout=30) as s:
        s.sendall(b"POST /count HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % size)
        block = b"u" * (1 << 20)
        for _ in range(size // len(block)):
            s.sendall(block)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        assert json.loads(resp.read())["received"] == size
    conn = http.client.HTTPConnection("127.0.0.1", big.inbound, timeout=30)
    try:
        conn.request("GET", f"/bytes/{size}")
        resp = conn.getresponse()
        got = 0
        while chunk := resp.read(1 << 20):
            got += len(chunk)
        assert resp.status == 200 and got == size
    finally:
        conn.close()
    # Peak RSS grew by far less than one body: nothing was buffered whole.
    assert big.hwm_kb() - before < 40 * 1024, (before, big.hwm_kb())


def _downstream_conns(port: int) -> int:
    """Sockets on the listener's port in any state but LISTEN/TIME_WAIT/CLOSE: open ones."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] not in ("0A", "06", "07"):
            n += 1
    return n


def test_abuse_leaks_no_connections(side: Sidecar) -> None:
    assert request(side.inbound, "/anything")[0] == 200
    for _ in range(30):
        raw_exchange(side.inbound, b"BAD REQUEST LINE\r\n\r\n")
        raw_exchange(side.inbound, b"GET /garbage HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    # Slow clients that never finish their head, all at once, then clients that vanish.
    slow = [socket.create_connection(("127.0.0.1", side.inbound)) for _ in range(10)]
    for s in slow:
        s.sendall(b"GET / HTTP/1.1\r\n")
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", side.inbound)) as gone:
            gone.sendall(b"GET /delay/0.2 HTTP/1.1\r\nhost: a\r\n\r\n")
    for s in slow:
        assert _status(s.recv(4096)) == 408
        s.close()
    deadline = time.monotonic() + 5
    while _downstream_conns(side.inbound) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _downstream_conns(side.inbound) == 0
    assert side.proc.poll() is None and request(side.inbound, "/anything")[0] == 200


FUZZ_TOKENS = st.sampled_from([
    b"GET ", b"POST ", b"HEAD ", b"/", b"/anything", b"/garbage", b" HTTP/1.1", b" HTTP/1.0",
    b"\r\n", b"host: a\r\n", b"content-length: 3\r\n", b"transfer-encoding: chunked\r\n",
    b"connection: close\r\n", b"connection: upgrade\r\nupgrade: x\r\n", b"\r\n\r\n", b"3\r\nabc",
    b"0\r\n\r\n", b"zz\r\n", b"\x00", b"\xff\xfe", b":", b" ",
])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(FUZZ_TOKENS, st.binary(max_size=16)), min_size=1, max_size=30))
def test_fuzzed_bytes_never_hurt_the_sidecar(side: Sidecar, parts: list[bytes]) -> None:
    data = b"".join(parts) + b"\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
    reply = raw_exchange(side.inbound, data, timeout=3)
    # Whatever came in, what goes out is HTTP responses or nothing, then a close.
    assert reply == b"" or reply.startswith(b"HTTP/1.1 ")
    for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply):
        assert 100 <= int(status) < 600
    assert side.proc.poll() is None


def test_idle_keep_alive_connection_is_closed(side: Sidecar) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", side.inbound, timeout=5)
    try:
        assert request(side.inbound, "/anything", conn=conn)[0] == 200
        t0 = time.monotonic()
        assert conn.sock.recv(65536) == b""  # closed by the sidecar, silently
        # At the idle limit, not early; a late close would raise the 5 s socket timeout.
        assert 0.8 < time.monotonic() - t0
    finally:
        conn.close()


def test_chunked_trailers_are_forwarded_both_ways(side: Sidecar) -> None:
    data = (b"POST /count HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n"
            b"trailer: x-checksum\r\nconnection: close\r\n\r\n5\r\nhello\r\n"
            b"0\r\nx-checksum: abc123\r\nhost: elsewhere\r\n\r\n")
    reply = raw_exchange(side.inbound, data)
    got = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert got["received"] == 5
    # The checksum reached the app; a routing field in the trailers did not.
    assert got["trailers"] == {"x-checksum": "abc123"}
    reply = raw_exchange(side.inbound, b"GET /trailers HTTP/1.1\r\nhost: a\r\n"
                                       b"connection: close\r\n\r\n")
    assert _status(reply) == 200
    assert reply.split(b"\r\n\r\n", 1)[1] == (
        b"5\r\nhello\r\n0\r\nx-checksum: abc123\r\nx-count: 5\r\n\r\n")


def test_trailers_do_not_leak_into_the_next_request(side: Sidecar) -> None:
    # Keep-alive: after a request with trailers, the next one on the connection is clean.
    first = (b"POST /count HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
             b"1\r\nx\r\n0\r\nx-late: 1\r\n\r\n")
    second = b"GET /anything HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
    reply = raw_exchange(side.inbound, first + second)
    bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])
              for part in reply.split(b"HTTP/1.1 200")[1:]]
    assert bodies[0]["trailers"] == {"x-late": "1"}
    assert "x-late" not in bodies[1]["headers"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_early_answer_during_upload_is_forwarded(big: Sidecar, chunked: bool) -> None:
    """The app answers 413 after the head without reading the body: the client gets that
    answer (with connection: close), not a 503 reset made by the sidecar."""
    framing = (b"transfer-encoding: chunked" if chunked
               else b"content-length: %d" % (64 * 1024 * 1024))
    part = b"u" * (256 * 1024)
    with socket.create_connection(("127.0.0.1", big.inbound), timeout=10) as s:
        s.sendall(b"POST /reject HTTP/1.1\r\nhost: a\r\n" + framing + b"\r\n\r\n")
        s.sendall(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
        # The client now waits with its upload unfinished, as a client reading the
        # answer early would; the sidecar must notice the app's answer by itself.
        reply = b""
        while b"\r\n\r\n" not in reply:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            reply += chunk
    assert _status(reply) == 413, reply[:300]
    assert _header(reply, b"x-app") == b"app"
    assert _header(reply, b"x-mesh-flags") is None
    assert _header(reply, b"connection") == b"close"
    assert request(big.inbound, "/anything")[0] == 200  # and the sidecar is fine


def test_early_answer_to_a_small_body_is_forwarded(side: Sidecar) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", side.inbound, timeout=5)
    try:
        for _ in range(3):  # on fresh and on pooled upstream connections
            status, headers, _ = request(side.inbound, "/reject", method="POST",
                                         body=b"b" * 5000, conn=conn)
            assert status == 413 and headers["x-app"] == "app"
            assert "x-mesh-flags" not in headers
    finally:
        conn.close()


def test_stalled_streamed_upload_gets_504(side: Sidecar) -> None:
    # Chunked, so streamed (with the early-answer watch running): the client stops
    # mid-body and the stream timeout answers.
    reply = raw_exchange(side.inbound, b"POST /count HTTP/1.1\r\nhost: a\r\n"
                         b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n", timeout=8)
    assert _status(reply) == 504
    assert _header(reply, b"x-mesh-flags") == b"UT"
    assert request(side.inbound, "/anything")[0] == 200


def _established_to(port: int) -> int:
    """Established TCP connections to 127.0.0.1:`port`, from /proc/net/tcp."""
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[3] == "01":
                count += 1
    return count


def test_a_client_reset_mid_upload_frees_the_upstream_connection(tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    try:
        app = procs.app("a")
        side = procs.sidecar("a", "v1", app, snapshot())
        with socket.create_connection(("127.0.0.1", side.inbound), timeout=5) as s:
            s.sendall(b"POST /count HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
                      b"5\r\nhello\r\n")
            deadline = time.monotonic() + 10
            while _established_to(app) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _established_to(app) == 1  # the sidecar is streaming the body to the app
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # RST: the sidecar must drop its half-sent upstream request at once, not wait for
        # the body until stream_timeout (300 s).
        deadline = time.monotonic() + 10
        while _established_to(app) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _established_to(app) == 0
        assert side.proc.poll() is None  # and the sidecar lives on
    finally:
        procs.close()
