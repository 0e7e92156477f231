"""The sans-io HTTP codec: framing, limits, writers, and a hypothesis fuzz of the parser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.http.codec import (
    BODY,
    END,
    FRAME_CHUNKED,
    HEAD,
    UPGRADE,
    ProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    encode_chunk,
    last_chunk,
    local_response,
    request_head_bytes,
    response_head_bytes,
)


def _feed_all(reader: RequestReader | ResponseReader, data: bytes, step: int) -> list[tuple[int, object]]:
    for i in range(0, len(data), step):
        reader.feed(data[i:i + step])
    return list(reader.events)


def _body(events: list[tuple[int, object]]) -> bytes:
    return b"".join(v for k, v in events if k == BODY and isinstance(v, bytes))


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_pipelined_requests_any_split(step: int) -> None:
    data = (b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nX-Y: z\r\n\r\n"
            b"POST /b HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n\r\nhello"
            b"PUT /c HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n")
    events = _feed_all(RequestReader(), data, step)
    heads = [v for k, v in events if k == HEAD]
    assert [h.method for h in heads if isinstance(h, RequestHead)] == [b"GET", b"POST", b"PUT"]
    first = heads[0]
    assert isinstance(first, RequestHead)
    assert first.target == b"/a?x=1" and first.path == "/a"
    assert first.headers == [(b"host", b"h"), (b"x-y", b"z")] and first.keep_alive
    assert [k for k, _ in events].count(END) == 3
    assert _body(events) == b"helloabcde"
    assert isinstance(heads[2], RequestHead) and heads[2].chunked


def test_http10_and_connection_close() -> None:
    events = _feed_all(RequestReader(), b"GET / HTTP/1.0\r\n\r\n", 100)
    head = events[0][1]
    assert isinstance(head, RequestHead) and not head.keep_alive and head.version == "1.0"
    events = _feed_all(RequestReader(), b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 100)
    assert isinstance(events[0][1], RequestHead) and not events[0][1].keep_alive


def test_upgrade_leaves_the_rest_for_the_tunnel() -> None:
    r = RequestReader()
    r.feed(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
           b"\x81\x05hello")
    kinds = [k for k, _ in r.events]
    assert kinds == [HEAD, END, UPGRADE]
    assert r.events[2][1] == b"\x81\x05hello"


@pytest.mark.parametrize(("data", "status"), [
    (b"GET / HTTP/1.1\r\nx: " + b"a" * 3000 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"POST / HTTP/1.1\r\ncontent-length: 2000\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n7d0\r\n" + b"a" * 2000, 413),
    (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nxyz\r\n", 400),
    (b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nhost : a\r\n\r\n", 400),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00", 400),  # a TLS hello on a plaintext port
])
def test_limits_and_malformed(data: bytes, status: int) -> None:
    r = RequestReader(max_header_bytes=2048, max_body_bytes=1000)
    with pytest.raises(ProtocolError) as info:
        r.feed(data)
    assert info.value.status == status


def test_slowly_growing_head_is_cut_off() -> None:
    r = RequestReader(max_header_bytes=1024)
    r.feed(b"GET / HTTP/1.1\r\nx-long: ")
    with pytest.raises(ProtocolError) as info:
        for _ in range(100):
            r.feed(b"b" * 100)
    assert info.value.status == 431


def test_response_framing_head_204_304_and_chunked() -> None:
    r = ResponseReader()
    r.expect_head_response()
    r.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
    assert [k for k, _ in r.events] == [HEAD, END]
    for status in (204, 304):
        r = ResponseReader()
        r.feed(b"HTTP/1.1 %d X\r\netag: 1\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
               % status)
        assert [k for k, _ in r.events] == [HEAD, END, HEAD, BODY, END]
    r = ResponseReader()
    r.feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nwiki\r\n0\r\n\r\n")
    head = r.events[0][1]
    assert isinstance(head, ResponseHead) and head.chunked and head.status == 200
    assert _body(list(r.events)) == b"wiki"
    with pytest.raises(ProtocolError) as info:
        ResponseReader().feed(b"\x00\x01 not http\r\n\r\n")
    assert (info.value.status, info.value.flag) == (502, "UPE")
    with pytest.raises(ProtocolError) as info:  # the upstream's fault, not the client's
        ResponseReader(max_header_bytes=1024).feed(
            b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 2000 + b"\r\n\r\n")
    assert (info.value.status, info.value.flag) == (502, "UPE")


def test_writers_drop_hop_by_hop_and_reframe() -> None:
    r = RequestReader()
    r.feed(b"POST /x HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, x-secret\r\n"
           b"X-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\ntransfer-encoding: chunked\r\n\r\n")
    head = r.events[0][1]
    assert isinstance(head, RequestHead)
    out = request_head_bytes(head, [(b"x-request-id", b"abc")], chunked=True)
    assert out == (b"POST /x HTTP/1.1\r\nhost: h\r\nx-request-id: abc\r\n"
                   b"transfer-encoding: chunked\r\n\r\n")
    resp = ResponseHead(200, b"OK", "1.1", [(b"content-length", b"5"), (b"x-a", b"b")],
                        True, False, False, 5)
    assert response_head_bytes(resp, FRAME_CHUNKED, keep_alive=False) == (
        b"HTTP/1.1 200 OK\r\nx-a: b\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"


def test_local_response_has_flag_reason_and_length() -> None:
    out = local_response(503, "UH", "no healthy endpoint\r\nx-evil: 1", b"rid")
    r = ResponseReader()
    r.feed(out)
    head = r.events[0][1]
    assert isinstance(head, ResponseHead)
    headers = dict(head.headers)
    assert headers[b"x-mesh-flags"] == b"UH"
    assert b"x-evil" not in headers  # no header injection through the reason
    assert headers[b"x-request-id"] == b"rid"
    assert [k for k, _ in r.events] == [HEAD, BODY, END]


# --- fuzz -------------------------------------------------------------------------------

TOKENS = st.sampled_from([
    b"GET", b"POST", b"HEAD", b" ", b"/", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\n", b":",
    b"host: a", b"content-length: ", b"transfer-encoding: chunked", b"connection: upgrade",
    b"upgrade: ws", b"0", b"5", b"ff", b"-1", b"99999999999999999999", b"\x00", b"\xff",
    b"abc", b"\r\n\r\n", b"expect: 100-continue",
])


def _check_events(reader: RequestReader) -> None:
    for kind, value in reader.events:
        assert kind in (HEAD, BODY, END, UPGRADE)
        if kind == HEAD:
            assert isinstance(value, RequestHead)
            assert value.content_length is None or value.content_length >= 0
        elif kind in (BODY, UPGRADE):
            assert isinstance(value, bytes)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(TOKENS, st.binary(max_size=20)), max_size=40),
       st.integers(min_value=1, max_value=64))
def test_fuzz_request_parser_only_raises_protocol_error(parts: list[bytes], step: int) -> None:
    data = b"".join(parts)
    reader = RequestReader(max_header_bytes=512, max_body_bytes=4096)
    try:
        for i in range(0, len(data), step):
            reader.feed(data[i:i + step])
    except ProtocolError as exc:
        assert exc.status in (400, 413, 414, 431)
        assert exc.reason
    _check_events(reader)


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"]),
    path=st.from_regex(rb"\A/[a-zA-Z0-9._~/-]{0,30}\Z"),
    headers=st.lists(st.tuples(st.from_regex(rb"\Ax-[a-z]{1,10}\Z"),
                               st.from_regex(rb"\A[!-~]{0,20}\Z")), max_size=5),
    body=st.binary(max_size=300),
    chunked=st.booleans(),
    step=st.integers(min_value=1, max_value=50),
)
def test_valid_requests_round_trip(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]],
                                   body: bytes, chunked: bool, step: int) -> None:
    head = b"%b %b HTTP/1.1\r\nhost: h\r\n" % (method, path)
    head += b"".join(b"%b: %b\r\n" % kv for kv in headers)
    if chunked:
        framed = b"".join(encode_chunk(body[i:i + 17]) for i in range(0, len(body), 17))
        data = head + b"transfer-encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"
    else:
        data = head + b"content-length: %d\r\n\r\n" % len(body) + body
    events = _feed_all(RequestReader(), data, step)
    got = events[0][1]
    assert isinstance(got, RequestHead)
    assert (got.method, got.target) == (method, path)
    assert got.headers[1:1 + len(headers)] == [(k, v.strip()) for k, v in headers]
    assert _body(events) == body and events[-1][0] == END


def test_two_host_headers_are_refused_and_connection_cannot_strip_host() -> None:
    import pytest

    from sidecar.http.codec import ProtocolError, RequestReader, request_head_bytes

    reader = RequestReader()
    with pytest.raises(ProtocolError) as info:
        reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert info.value.status == 400 and "Host" in info.value.reason

    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: host, x-drop\r\nX-Drop: 1\r\n\r\n")
    head = reader.events[0][1]
    out = request_head_bytes(head, [], chunked=False)  # type: ignore[arg-type]
    assert b"host: a\r\n" in out.lower() and b"x-drop" not in out.lower()


def test_chunked_trailers_end_the_message_apart_from_the_head() -> None:
    r = RequestReader()
    r.feed(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n0\r\nx-sum: abc\r\nhost: b\r\nconnection: x\r\n\r\n")
    head, body, end = list(r.events)
    assert isinstance(head[1], RequestHead)
    assert head[1].headers == [(b"host", b"a"), (b"transfer-encoding", b"chunked")]
    assert body == (BODY, b"hello")
    assert end == (END, [(b"x-sum", b"abc"), (b"host", b"b"), (b"connection", b"x")])
    # Routing and hop-by-hop fields are not forwarded as trailers.
    assert last_chunk(end[1]) == b"0\r\nx-sum: abc\r\n\r\n"  # type: ignore[arg-type]
    assert last_chunk(None) == b"0\r\n\r\n"
    resp = ResponseReader()
    resp.feed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx-t: 1\r\n\r\n")
    assert list(resp.events)[-1] == (END, [(b"x-t", b"1")])


def test_the_reader_picks_out_trace_context_while_parsing() -> None:
    r = RequestReader()
    r.feed(b"GET / HTTP/1.1\r\nHost: a\r\nTraceparent: first\r\ntraceparent: second\r\n"
           b"tracestate: a=1\r\nTRACESTATE: b=2\r\n\r\n"
           b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    heads = [v for k, v in r.events if k == HEAD]
    assert isinstance(heads[0], RequestHead) and isinstance(heads[1], RequestHead)
    # Two traceparents: neither is trusted (b"" is invalid: the hop starts a new trace).
    assert (heads[0].traceparent, heads[0].tracestate) == (b"", b"a=1,b=2")
    assert (heads[1].traceparent, heads[1].tracestate) == (None, None)  # reset per message
    assert heads[0].get(b"traceparent") == b"first"  # the header list is untouched
