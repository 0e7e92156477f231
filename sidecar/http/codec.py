"""Sans-io HTTP/1.1 framing on top of httptools (llhttp): bytes in, events out.

No sockets here: a reader is fed bytes and appends events to `events`; the proxy
drains them. Events are tuples `(kind, value)` because this is the hot path and a
tuple is the cheapest thing Python builds.

Kinds:
  HEAD    value: RequestHead / ResponseHead
  BODY    value: bytes (decoded: chunked framing already removed)
  END     value: None, or the trailer fields of a chunked message (list of (name, value),
          names lower-cased)
  UPGRADE value: bytes received after the head of an upgraded message (belongs to
          the tunnel, not to HTTP)

Protocol errors raise ProtocolError carrying the status and flag to answer with.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import httptools

HEAD = 0
BODY = 1
END = 2
UPGRADE = 3

Event = tuple[int, object]

# Hop-by-hop headers (RFC 9110 7.6.1) are dropped when forwarding; framing headers are
# re-made by the writer because the proxy may re-frame a body.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})


class ProtocolError(Exception):
    """The peer sent something we cannot parse; answer with status and close."""

    def __init__(self, status: int, flag: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.flag = flag
        self.reason = reason


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: str
    headers: list[tuple[bytes, bytes]]  # names lower-cased
    keep_alive: bool
    upgrade: bool
    chunked: bool
    content_length: int | None
    # W3C trace context, picked out while parsing (the proxy reads them per request):
    # the traceparent (b"" when there were several), and every tracestate field joined
    # as RFC 9110 5.3 says.
    traceparent: bytes | None = None
    tracestate: bytes | None = None

    def get(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def path(self) -> str:
        t = self.target.split(b"?", 1)[0]
        return t.decode("latin-1")


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    upgrade: bool
    chunked: bool
    content_length: int | None


class _Reader:
    """Shared callback plumbing for request and response readers."""

    def __init__(self, max_header_bytes: int) -> None:
        self.events: deque[Event] = deque()
        self.max_header_bytes = max_header_bytes
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_head = False
        self._error: ProtocolError | None = None
        self._chunked = False
        self._content_length: int | None = None
        self._trailers: list[tuple[bytes, bytes]] | None = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._headers = []
        self._head_bytes = 0
        self._in_head = True
        self._chunked = False
        self._content_length = None
        self._trailers = None

    def on_header(self, name: bytes, value: bytes) -> None:
        # RequestReader has its own copy of this (plus the Host check): a super() call per
        # header costs more than the rest of it.
        self._head_bytes += len(name) + len(value) + 4
        name = name.lower()
        if not self._in_head:
            self._trailer(name, value)
        elif name == b"content-length":
            self._set_length(value)
            self._headers.append((name, value))
        else:
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
            self._headers.append((name, value))

    def _trailer(self, name: bytes, value: bytes) -> None:
        # llhttp reports a chunked message's trailer fields as headers too, after the body:
        # kept apart (the head has been handed out already) and bounded like the head.
        self._check_head_size()
        if self._trailers is None:
            self._trailers = []
        self._trailers.append((name, value))

    def _set_length(self, value: bytes) -> None:
        try:
            n = int(value)
        except ValueError:
            n = -1
        if n < 0 or (self._content_length is not None and self._content_length != n):
            self._error = ProtocolError(400, "DPE", "invalid Content-Length")
            raise self._error
        self._content_length = n

    def on_body(self, body: bytes) -> None:
        self.events.append((BODY, body))

    def on_message_complete(self) -> None:
        self.events.append((END, self._trailers))

    # What a parse error answers: the client's fault (400) or the upstream's (502).
    _MALFORMED = (400, "DPE", "malformed request")
    _parser: Any  # set by each subclass: a request or a response parser

    def feed(self, data: bytes | bytearray) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.events.append((UPGRADE, bytes(data[exc.args[0]:])))
            return
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            status, flag, what = self._MALFORMED
            raise ProtocolError(status, flag, f"{what}: {_describe(exc)}") from None
        if self._in_head:
            # A head still incomplete after this buffer: count whole buffers, since
            # httptools only reports a header once its value is complete.
            self._head_bytes += len(data)
            self._check_head_size()

    def _check_head_size(self) -> None:
        if self._head_bytes > self.max_header_bytes:
            self._error = ProtocolError(
                431, "DPE", f"header block over {self.max_header_bytes} bytes")
            raise self._error


class RequestReader(_Reader):
    """Frames requests from a client connection (pipelining: events queue in order)."""

    def __init__(self, max_header_bytes: int = 16384, max_body_bytes: int | None = None) -> None:
        super().__init__(max_header_bytes)
        self.max_body_bytes = max_body_bytes
        self._body_bytes = 0
        self._url = b""
        self._hosts = 0
        self._traceparent: bytes | None = None
        self._tracestate: list[bytes] | None = None  # every field, joined at the head's end
        self._parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        # _Reader.on_message_begin's resets, inlined (no super() call per request).
        self._headers = []
        self._head_bytes = 0
        self._in_head = True
        self._chunked = False
        self._content_length = None
        self._trailers = None
        self._url = b""
        self._body_bytes = 0
        self._hosts = 0
        self._traceparent = None
        self._tracestate = None

    def on_header(self, name: bytes, value: bytes) -> None:
        # _Reader.on_header, inlined, plus the Host check.
        self._head_bytes += len(name) + len(value) + 4
        name = name.lower()
        if not self._in_head:
            self._trailer(name, value)
            return
        if name == b"host":
            self._hosts += 1
            if self._hosts > 1:
                # RFC 9112 3.2: two Hosts let the proxy and the upstream disagree on the target.
                self._error = ProtocolError(400, "DPE", "more than one Host header")
                raise self._error
        elif name == b"content-length":
            self._set_length(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            self._chunked = True
        elif name == b"traceparent":
            # Two traceparents: which one is meant cannot be known, so neither (W3C's
            # test suite expects a new trace); b"" is invalid, hence a new trace.
            self._traceparent = value if self._traceparent is None else b""
        elif name == b"tracestate":
            if self._tracestate is None:
                self._tracestate = [value]
            else:
                self._tracestate.append(value)
        self._headers.append((name, value))

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.max_header_bytes:
            self._error = ProtocolError(
                431 if len(self._url) <= self.max_header_bytes else 414, "DPE",
                "request line too long")
            raise self._error

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._check_head_size()
        p = self._parser
        if (self.max_body_bytes is not None and self._content_length is not None
                and self._content_length > self.max_body_bytes):
            self._error = ProtocolError(413, "DPE",
                                        f"request body over {self.max_body_bytes} bytes")
            raise self._error
        if self._chunked and self._content_length is not None:
            # Request smuggling guard (RFC 9112 6.1): refuse rather than guess.
            self._error = ProtocolError(400, "DPE", "both Content-Length and chunked")
            raise self._error
        # Positional: keyword arguments cost ~0.2 us more per head, twice a request.
        self.events.append((HEAD, RequestHead(
            p.get_method(), self._url, p.get_http_version(), self._headers,
            p.should_keep_alive(), p.should_upgrade(), self._chunked, self._content_length,
            self._traceparent,
            b",".join(self._tracestate) if self._tracestate is not None else None)))

    def on_body(self, body: bytes) -> None:
        if self.max_body_bytes is not None:
            self._body_bytes += len(body)
            if self._body_bytes > self.max_body_bytes:
                self._error = ProtocolError(413, "DPE",
                                            f"request body over {self.max_body_bytes} bytes")
                raise self._error
        self.events.append((BODY, body))

class ResponseReader(_Reader):
    """Frames one response at a time from an upstream connection.

    `expect_head_response()` must be called before feeding the response to a HEAD
    request: llhttp cannot be told that such a response has no body.
    """

    def __init__(self, max_header_bytes: int = 65536) -> None:
        super().__init__(max_header_bytes)
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = False
        self._status = 0

    _MALFORMED = (502, "UPE", "malformed upstream response")

    def expect_head_response(self) -> None:
        self._head_request = True

    def _check_head_size(self) -> None:
        if self._head_bytes > self.max_header_bytes:
            self._error = ProtocolError(
                502, "UPE", f"upstream header block over {self.max_header_bytes} bytes")
            raise self._error

    def on_status(self, status: bytes) -> None:
        self._reason = status

    def on_message_begin(self) -> None:
        # _Reader.on_message_begin's resets, inlined (no super() call per response).
        self._headers = []
        self._head_bytes = 0
        self._in_head = True
        self._chunked = False
        self._content_length = None
        self._trailers = None
        self._reason = b""

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._check_head_size()
        p = self._parser
        status = p.get_status_code()
        self._status = status
        self.events.append((HEAD, ResponseHead(
            status, self._reason, p.get_http_version(), self._headers, p.should_keep_alive(),
            p.should_upgrade(), self._chunked, self._content_length)))
        if self._head_request and status >= 200:
            self.events.append((END, None))

    def on_body(self, body: bytes) -> None:
        if self._head_request:
            # Bytes after a HEAD response are not ours: the connection is unusable.
            self._error = ProtocolError(502, "UPE", "body after a HEAD response")
            raise self._error
        self.events.append((BODY, body))

    def on_message_complete(self) -> None:
        if self._head_request and self._status >= 200:
            return  # END already queued at headers complete
        self.events.append((END, self._trailers))

def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.split("\n")[0][:120]


# --- writers ----------------------------------------------------------------------------


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
# Trailer fields never forwarded: hop-by-hop ones and those that would change framing or
# routing if a later hop merged them into the head (RFC 9110 6.5.1).
_NOT_TRAILERS = HOP_BY_HOP | {b"content-length", b"host"}


def last_chunk(trailers: list[tuple[bytes, bytes]] | None) -> bytes:
    """The end of a chunked body, carrying the message's trailer fields (END's value)."""
    if not trailers:
        return LAST_CHUNK
    parts = [b"0\r\n"]
    for k, v in trailers:
        if k not in _NOT_TRAILERS:
            parts += (k, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def request_head_bytes(head: RequestHead, extra: list[tuple[bytes, bytes]],
                       chunked: bool, replace: frozenset[bytes] = frozenset()) -> bytes:
    """Serialise a request head for the upstream, dropping hop-by-hop headers and the
    `replace` ones (which `extra` sets instead)."""
    drop = _connection_tokens(head.headers)
    parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
    for k, v in head.headers:
        if k in HOP_BY_HOP or (drop and k in drop) or k in replace:
            continue
        parts += (k, b": ", v, b"\r\n")
    for k, v in extra:
        parts += (k, b": ", v, b"\r\n")
    if head.upgrade:
        up = head.get(b"upgrade")
        if up is not None:
            parts += (b"connection: upgrade\r\nupgrade: ", up, b"\r\n")
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def response_head_bytes(head: ResponseHead, framing: int, keep_alive: bool,
                        extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """Serialise a response head for the client. `framing` is one of FRAME_*."""
    drop = _connection_tokens(head.headers)
    parts = [b"HTTP/1.1 %d %b\r\n" % (head.status, head.reason or b"-")]
    for k, v in head.headers:
        if k in HOP_BY_HOP or (drop and k in drop):
            continue
        if framing == FRAME_CHUNKED and k == b"content-length":
            continue
        parts += (k, b": ", v, b"\r\n")
    if extra:
        for k, v in extra:
            parts += (k, b": ", v, b"\r\n")
    if head.status == 101:
        up = _get(head.headers, b"upgrade")
        parts += (b"connection: upgrade\r\nupgrade: ", up or b"", b"\r\n")
    elif framing == FRAME_CHUNKED:
        parts.append(b"transfer-encoding: chunked\r\n")
    if head.status != 101 and not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


FRAME_NONE = 0  # no body (HEAD, 1xx, 204, 304) or Content-Length as given
FRAME_CHUNKED = 1  # re-encode as chunked
FRAME_CLOSE = 2  # body ends when the connection closes


def _get(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


# Connection values that name no other header: the usual ones, answered without a set.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade", b"Keep-Alive", b"Close",
                               b"Upgrade"})


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes] | None:
    for k, v in headers:
        if k == b"connection":
            if v in _PLAIN_CONNECTION:
                return None
            tokens = {t.strip().lower() for t in v.split(b",")}
            # Host must reach the upstream whatever the client lists in Connection.
            tokens -= {b"close", b"keep-alive", b"upgrade", b"host"}
            return frozenset(tokens) if tokens else None
    return None


def local_response(status: int, flag: str, reason: str, request_id: bytes | None = None,
                   keep_alive: bool = True, head_only: bool = False) -> bytes:
    """A response the sidecar makes itself: always with x-mesh-flags and x-mesh-reason."""
    body = f"{status} {_REASONS.get(status, 'Error')}: {reason} [{flag}]\n".encode()
    safe_reason = reason.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    parts = [
        b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, "Error").encode()),
        b"content-type: text/plain\r\ncontent-length: %d\r\n" % len(body),
        b"x-mesh-flags: %b\r\nx-mesh-reason: %b\r\n" % (flag.encode(), safe_reason),
    ]
    if request_id is not None:
        parts.append(b"x-request-id: %b\r\n" % request_id)
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


_REASONS = {
    200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 408: "Request Timeout",
    413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}
