"""The HTTP/1.1 proxy: one task per downstream connection, no task per request.

Per request, the layers run in this order, each a short block below:
route (outbound: Host + match; inbound: the local app) -> fault (per try) ->
retry (attempts, budget, backoff) -> timeout -> balance -> outlier -> pool.

Timeouts: one CancelScope per connection whose deadline is moved per phase (idle,
header read, upstream wait, streaming). A per-request `move_on_after` costs ~5 us
and a task ~45 us (shared/FACTS.md); only a configured per-try timeout opens a scope
per attempt. When the connection scope fires, the phase says what to answer.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from time import perf_counter

import trio
from opentelemetry.trace import SpanKind

from mesh.snapshot import Endpoint, Fault
from mesh.spiffe import SpiffeId
from sidecar import flags as F
from sidecar.budget import backoff_delay
from sidecar.cluster import ClusterState
from sidecar.fastio import (
    FastSocket,
    close_now,
    io_for,
    set_nodelay,
    socket_stream,
    wait_recv_for,
)
from sidecar.fault import decide
from sidecar.http.codec import (
    BODY,
    END,
    FRAME_CHUNKED,
    FRAME_CLOSE,
    FRAME_NONE,
    HEAD,
    LAST_CHUNK,
    UPGRADE,
    ProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    encode_chunk,
    last_chunk,
    local_response,
    request_head_bytes,
    response_head_bytes,
)
from sidecar.mirror import Mirror
from sidecar.pool import ConnectFailed, Overflow, Pool, UpstreamConn
from sidecar.route import CompiledRoute
from sidecar.runtime import Runtime
from sidecar.splice import splice
from sidecar.stats import Stats
from sidecar.telemetry import FOLD_EVERY, SidecarTelemetry
from sidecar.tracing import Hop

log = logging.getLogger("mesh.sidecar")

RECV = 65536
RETRY_BUFFER = 65536  # bodies up to this size are kept so the request can be retried
_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

IDLE, HEADER, BODY_READ, UPSTREAM, STREAMING, TUNNEL = range(6)
# The app cannot claim to be another service: outbound replaces what it sent.
PEER_IDENTITY = b"x-mesh-peer-identity"  # the mTLS-verified caller, set by the inbound side
_SOURCE = frozenset({b"x-mesh-source", PEER_IDENTITY})
_NOTHING: frozenset[bytes] = frozenset({PEER_IDENTITY})  # inbound: only we may say who called
_TRACE = frozenset({b"traceparent", b"tracestate"})  # replaced by this hop's, when tracing
_SOURCE_TRACE = _SOURCE | _TRACE
_NOTHING_TRACE = _NOTHING | _TRACE


class ClientGone(Exception):
    pass


class _Failure:
    """An attempt that produced no usable upstream response."""

    __slots__ = ("condition", "flag", "reason", "status")

    def __init__(self, status: int, flag: str, reason: str, condition: str | None) -> None:
        self.status = status
        self.flag = flag
        self.reason = reason
        self.condition = condition  # retry_on condition it matches, if any


class _Downstream:
    __slots__ = ("body_unread", "delayed", "dst", "flag", "idle_deadline", "io", "peer", "phase",
                 "reader", "request_id", "responded", "scope", "src", "status", "stream", "tx",
                 "upstream", "upstream_partial", "version", "wait_recv")

    def __init__(self, stream: trio.abc.Stream, reader: RequestReader,
                 scope: trio.CancelScope) -> None:
        self.stream = stream
        self.io = io_for(stream)
        self.wait_recv = wait_recv_for(self.io)
        self.reader = reader
        self.scope = scope
        self.phase = IDLE
        self.responded = False
        self.delayed = False
        # The upstream answered before it had the whole request (e.g. 413 during an upload):
        # that upstream connection cannot be reused, and if the client's body was not all
        # read, neither can the client's.
        self.upstream_partial = False
        self.body_unread = False
        self.idle_deadline = math.inf
        self.peer: SpiffeId | None = None  # inbound over mTLS: the verified caller
        # What the client got, for telemetry (set where the response is sent).
        self.status = 0
        self.flag = ""
        self.tx = 0
        self.upstream: Endpoint | str = ""
        self.version = ""
        self.request_id = b""
        self.src: str | None = None
        self.dst = ""

    async def recv_into_reader(self) -> None:
        try:
            data = await self.io.receive_some(RECV)
        except _IO_ERRORS:
            # A reset is the client going away too. As a bare OSError it would read as the
            # upstream's failure wherever a client read sits inside an upstream exchange
            # (streaming a body), and hold that upstream connection until stream_timeout.
            raise ClientGone from None
        if not data:
            raise ClientGone
        self.reader.feed(data)


class HttpProxy:
    """Serves one listener. `outbound`: the app's requests to other services;
    otherwise inbound: other sidecars' requests to the local app."""

    def __init__(self, listener: str, runtime: Callable[[], Runtime], pool: Pool, stats: Stats,
                 service: str, rng: random.Random, telemetry: SidecarTelemetry | None = None,
                 version: str = "", mirror: Mirror | None = None) -> None:
        self.listener = listener
        self.outbound = listener == "outbound"
        self._runtime = runtime
        self.pool = pool
        self.stats = stats
        self.service = service.encode()
        self.service_name = service
        self._rng = rng
        self.telemetry = telemetry
        self._span_kind = SpanKind.CLIENT if self.outbound else SpanKind.SERVER
        self.version = version
        self.mirror = mirror  # route mirrors' copies run in its nursery (sidecar/mirror.py)
        # Authorization may use the caller's declared x-mesh-source only while this sidecar
        # has no mTLS identity (sidecar/server.py turns it off with one).
        self.trust_declared_source = True

    async def handle(self, stream: trio.abc.Stream, peer: SpiffeId | None = None) -> None:
        """Connection handler for trio.serve_listeners: never raises. `peer`: the caller's
        SPIFFE ID verified by mTLS (sidecar/mtls.py), inbound only."""
        self.stats.downstream_connections += 1
        limits = self._runtime().limits
        c = _Downstream(stream, RequestReader(limits.max_header_bytes, limits.max_body_bytes),
                        trio.CancelScope(deadline=trio.current_time() + limits.idle_timeout))
        c.peer = peer
        c.idle_deadline = c.scope.deadline
        try:
            set_nodelay(stream)
            while True:
                with c.scope:
                    try:
                        await self._serve(c)
                    except ProtocolError as exc:
                        await self._reply_error(c, exc.status, exc.flag, exc.reason)
                if not c.scope.cancelled_caught:
                    break
                if c.phase == IDLE and trio.current_time() < c.idle_deadline:
                    # The deadline that fired was the last request's, left in place to
                    # save a deadline move per request; nothing was lost: go on idling.
                    c.scope = trio.CancelScope(deadline=c.idle_deadline)
                    continue
                await self._on_timeout(c)
                break
        except (ClientGone, *_IO_ERRORS):
            pass
        except Exception:
            # A bug must cost one connection, never the sidecar.
            log.exception("%s: unexpected error on a connection", self.listener)
        finally:
            close_now(stream)

    async def _reply_error(self, c: _Downstream, status: int, flag: str, reason: str) -> None:
        if c.responded:
            return
        self._count_local(status, flag)
        c.responded = True
        c.status, c.flag = status, flag
        with trio.move_on_after(1):  # error path only: do not hang on a stuck client
            await c.io.send_all(local_response(status, flag, reason, keep_alive=False))

    async def _on_timeout(self, c: _Downstream) -> None:
        if c.phase == HEADER:
            await self._reply_error(c, 408, F.DOWNSTREAM_TIMEOUT, "request header read timeout")
        elif c.phase == BODY_READ:
            await self._reply_error(c, 408, F.DOWNSTREAM_TIMEOUT, "request body read timeout")
        elif c.phase == UPSTREAM:
            flag = F.UPSTREAM_TIMEOUT + ("," + F.FAULT_DELAY if c.delayed else "")
            await self._reply_error(c, 504, flag, "upstream request timeout")

    def _count_local(self, status: int, flag: str) -> None:
        self.stats.responses[(self.listener, status)] += 1
        self.stats.flags[(self.listener, flag)] += 1

    # --- the request loop -------------------------------------------------------------

    async def _serve(self, c: _Downstream) -> None:
        events = c.reader.events
        while True:
            rt = self._runtime()
            c.phase = IDLE
            c.responded = False
            c.delayed = False
            if events:
                # Pipelined: the reads that fetched it may not have been checkpoints.
                await trio.lowlevel.checkpoint()
            else:
                # Deadlines are moved only when a wait can actually happen (a move costs
                # ~2 us of the ~50 us a request costs). While idle, the last request's
                # deadline may stay if it comes first; handle() then tells the two apart.
                c.idle_deadline = trio.current_time() + rt.limits.idle_timeout
                if c.scope.deadline > c.idle_deadline:
                    c.scope.deadline = c.idle_deadline
                data = await c.wait_recv(RECV)
                if not data:
                    return
                c.phase = HEADER
                c.reader.feed(data)
                rt = self._runtime()  # a snapshot swapped while this connection was idle
                if not events:
                    c.scope.deadline = trio.current_time() + rt.limits.header_timeout
                    while not events:
                        await c.recv_into_reader()
            kind, value = events.popleft()
            if kind != HEAD:  # bytes after an upgrade that was refused: give up on it
                return
            assert isinstance(value, RequestHead)
            if not await self._request(c, rt, value):
                return

    def _drop(self, c: _Downstream) -> frozenset[bytes]:
        """Request headers replaced on the way upstream."""
        if self.telemetry is not None:
            return _SOURCE_TRACE if self.outbound or c.peer else _NOTHING_TRACE
        return _SOURCE if self.outbound or c.peer else _NOTHING

    async def _request(self, c: _Downstream, rt: Runtime, head: RequestHead) -> bool:
        """Proxy one request; return whether the client connection stays open.

        With telemetry: one hop (span) per request, counted once it is answered."""
        tel = self.telemetry
        if tel is None:
            return await self._proxy(c, rt, head, None)
        # SidecarTelemetry's begin/end, inlined: at ~50 us a request, each call layer
        # here was a visible share of the telemetry cost (bench/telemetry.py).
        started = perf_counter()
        fresh = tel.fresh_hops
        # A new unsampled trace, drawn in a batch (HopTracer._refill), or the general case.
        hop = (fresh.pop() if head.traceparent is None and fresh and fresh[-1] is not None
               else None)
        if hop is None:
            hop = tel.start_request_hop(head.method, head.target, head.traceparent,
                                        head.tracestate, self._span_kind)
        c.status, c.flag, c.tx, c.upstream, c.version = 0, "", 0, "", ""
        c.src, c.dst, c.request_id = None, "unknown", b""
        try:
            return await self._proxy(c, rt, head, hop)
        finally:
            duration = perf_counter() - started
            if self.outbound:
                src, dst = self.service_name, c.dst  # dst: the route's cluster
            else:
                src, dst = c.src or "unknown", self.service_name
                c.version = self.version
            # Counted once in the mesh: by the caller's sidecar, or inbound when the
            # caller is not in the mesh (SidecarTelemetry.end).
            count = self.outbound or c.src is None
            if tel.access_log is None:
                if count:
                    pending = tel.requests_pending
                    pending.append((src, dst, c.version, c.status, c.flag, duration,
                                    head.content_length or 0, c.tx))
                    if len(pending) >= FOLD_EVERY:
                        tel.recorder.fold()
                if hop.sampled:  # only a sampled hop has a span to end
                    hop.finish(c.status, c.flag)
            else:
                tel.end(hop, src=src, dst=dst, dst_version=c.version, status=c.status,
                        flags=c.flag, start_time=time.time() - duration, duration=duration,
                        rx_bytes=head.content_length or 0, tx_bytes=c.tx,
                        method=head.method.decode("latin-1"), path=head.path,
                        authority=(head.get(b"host") or b"").decode("latin-1"),
                        upstream=str(c.upstream), request_id=c.request_id.decode("latin-1"),
                        count=count)

    async def _proxy(self, c: _Downstream, rt: Runtime, head: RequestHead,
                     hop: Hop | None) -> bool:
        if not head.has_body and not head.upgrade:
            events = c.reader.events
            while not events:  # the END of a body-less request
                await c.recv_into_reader()
            events.popleft()
        rid = head.get(b"x-request-id")
        extra: list[tuple[bytes, bytes]] = []
        if rid is None:
            if hop is not None and hop.new:
                # The trace this request starts names it too: an access-log line and
                # its trace are then found by one id, and no second id is drawn.
                rid = hop.header[3:35]
            else:
                rid = b"%032x" % self._rng.getrandbits(128)  # os.urandom costs a syscall
            extra.append((b"x-request-id", rid))
        c.request_id = rid
        if hop is not None:
            extra.append((b"traceparent", hop.header))
            if hop.state_header:
                extra.append((b"tracestate", hop.state_header))
        if self.outbound:
            source: str | None = self.service_name
            extra.append((b"x-mesh-source", self.service))
            route = rt.router.find(head, source)
            if route is None:
                host = (head.get(b"host") or b"").decode("latin-1")
                return await self._local(c, head, rid, 404, F.NO_ROUTE,
                                         f"no route for host {host!r} path {head.path!r}",
                                         not head.has_body)
            fault = route.route.fault
            c.dst = route.cluster.config.name
        else:
            peer = c.peer
            if peer is not None:  # verified by mTLS: replaces what the caller declared
                source = peer.service_account
                extra.append((b"x-mesh-source", source.encode()))
                extra.append((PEER_IDENTITY, peer.uri.encode()))
            else:
                src = head.get(b"x-mesh-source")
                source = src.decode("latin-1") if src is not None else None
            if rt.authz.active:
                denied = rt.authz.check(
                    peer, source if peer is None and self.trust_declared_source else None, head)
                if denied is not None:
                    return await self._local(c, head, rid, 403, F.DENIED, denied,
                                             not head.has_body)
            c.src = source
            route = rt.inbound_route
            fault = rt.inbound_fault(head, source) if rt.inbound_faults else None
        if head.has_body and head.get(b"expect") is not None:
            # We read the whole body before the upstream answers, so say 100 ourselves.
            head.headers = [(k, v) for k, v in head.headers if k != b"expect"]
            await c.io.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")

        cluster = route.cluster
        breaker = cluster.breaker
        if breaker.active_requests >= cluster.config.circuit_breaker.max_requests:
            self._count_overflow(cluster)
            return await self._local(c, head, rid, 503, F.UPSTREAM_OVERFLOW,
                                     f"cluster {cluster.config.name!r}: max_requests reached",
                                     not head.has_body)
        breaker.active_requests += 1
        try:
            return await self._forward(c, rt, head, route, cluster, fault, extra, rid)
        finally:
            breaker.active_requests -= 1

    async def _forward(self, c: _Downstream, rt: Runtime, head: RequestHead,
                       route: CompiledRoute, cluster: ClusterState, fault: Fault | None,
                       extra: list[tuple[bytes, bytes]], rid: bytes) -> bool:
        events = c.reader.events
        body: bytes | None = b""
        if head.chunked or (head.content_length or 0) > RETRY_BUFFER:
            body = None  # streamed once; only a failure before sending it is retried
        elif head.content_length:
            parts = []
            if not events or events[-1][0] != END:
                # The body did not come with the head: the client gets header_timeout
                # for it too (and the previous request's deadline must not apply).
                c.phase = BODY_READ
                c.scope.deadline = trio.current_time() + rt.limits.header_timeout
            while True:
                while not events:
                    await c.recv_into_reader()
                kind, value = events.popleft()
                if kind == END:
                    break
                assert isinstance(value, bytes)
                parts.append(value)
            body = b"".join(parts)
        elif head.upgrade and events and events[0][0] == END:
            events.popleft()

        policy = route.route.retries
        cluster.budget.on_request()
        c.phase = UPSTREAM
        # Moved lazily, as nginx moves its timers (NGX_TIMER_LAZY_DELAY): a deadline
        # already within [now + timeout, + slack] is kept, so on a busy connection the
        # scope is touched a few times a second instead of per request (a move costs
        # ~1.5 us). The route timeout therefore fires up to `deadline_slack` late.
        want = trio.current_time() + route.route.timeout
        if not want <= c.scope.deadline <= want + route.deadline_slack:
            c.scope.deadline = want + route.deadline_slack
        drop = self._drop(c)
        head_bytes = request_head_bytes(head, extra, head.chunked, drop)
        mirror = route.route.mirror
        if mirror is not None and self.mirror is not None:
            # Fire-and-forget: queued in the Mirror's nursery, never awaited here.
            self.mirror.maybe_send(mirror, rt.clusters.get(mirror.cluster), head, extra, drop,
                                   body, route.route.timeout)
        attempt = 0
        exhausted = False  # a retryable outcome that was not retried: flagged URX
        while True:
            result = await self._attempt(c, head, head_bytes, body, route, cluster, fault)
            if isinstance(result, _Failure):
                status, condition = result.status, result.condition
            else:
                status, condition = result[1].status, None
            retryable = (condition in policy.on if condition is not None
                         else status in policy.statuses)
            if retryable and attempt + 1 < policy.attempts and (body is not None or (
                    isinstance(result, _Failure) and condition == "connect-failure")):
                if cluster.budget.try_retry():
                    if not isinstance(result, _Failure):
                        result[0].close()  # the unread response body makes it unusable
                    self.stats.retries += 1
                    if self.telemetry is not None:  # rare: off the common path
                        self.telemetry.recorder.retry(self.service_name, cluster.config.name,
                                                      c.version)
                    attempt += 1
                    await trio.sleep(backoff_delay(policy.backoff, attempt - 1, self._rng))
                    continue
                self.stats.budget_exhausted += 1
                exhausted = True
                if isinstance(result, _Failure):
                    result.flag += "," + F.RETRY_EXHAUSTED
                    result.reason += " (retry budget exhausted)"
            elif retryable and attempt > 0 and attempt + 1 >= policy.attempts:
                # URX only when retries ran out, not when a streamed body made one impossible.
                exhausted = True
                if isinstance(result, _Failure):
                    result.flag += "," + F.RETRY_EXHAUSTED
            break
        if isinstance(result, _Failure):
            keep = body is not None  # a streamed body may be half read
            return await self._local(c, head, rid, result.status, result.flag,
                                     result.reason, keep)
        conn, resp = result
        if exhausted:
            # As Envoy does: the upstream's own answer is forwarded, marked as the last try.
            _add_flag(resp, F.RETRY_EXHAUSTED)
            c.flag = F.RETRY_EXHAUSTED
        return await self._respond(c, head, conn, resp, cluster)

    async def _attempt(self, c: _Downstream, head: RequestHead, head_bytes: bytes,
                       body: bytes | None, route: CompiledRoute, cluster: ClusterState,
                       fault: Fault | None) -> _Failure | tuple[UpstreamConn, ResponseHead]:
        if fault is not None:
            delay, abort = decide(fault, self._rng)
            if delay:
                c.delayed = True
                await trio.sleep(delay)
            if abort is not None:
                return _Failure(abort, F.FAULT_ABORT, "fault injected: abort", None)
        subset = route.pick_subset()
        key = head.get(cluster.hash_header) if cluster.hash_header is not None else None
        ep = cluster.pick(subset, key)
        if ep is None:
            return _Failure(503, F.NO_HEALTHY_UPSTREAM,
                            f"no healthy endpoint in {cluster.config.name}/{subset}", None)
        health = cluster.health[ep]
        health.active += 1
        c.upstream, c.version = ep, subset  # str(ep) only if an access log asks
        try:
            per_try = route.route.retries.per_try_timeout
            if per_try is None:
                out = await self._exchange(c, head, head_bytes, body, cluster, ep,
                                           route.route.timeout)
            else:
                out = _Failure(504, F.UPSTREAM_TIMEOUT, f"per-try timeout from {ep}", "timeout")
                with trio.move_on_after(per_try):
                    out = await self._exchange(c, head, head_bytes, body, cluster, ep,
                                               route.route.timeout)
        finally:
            health.active -= 1
        if isinstance(out, _Failure):
            if out.flag == F.UPSTREAM_OVERFLOW:
                self._count_overflow(cluster)
            elif cluster.outlier.on_failure(ep):
                self._count_ejection(cluster)
                log.warning("ejected %s from cluster %s", ep, cluster.config.name)
        elif out[1].status >= 500:
            if cluster.outlier.on_failure(ep):
                self._count_ejection(cluster)
                log.warning("ejected %s from cluster %s (5xx)", ep, cluster.config.name)
        elif health.consecutive:  # on_success only resets this count: skip when it is 0
            cluster.outlier.on_success(ep)
        return out

    def _count_ejection(self, cluster: ClusterState) -> None:
        self.stats.ejections += 1
        if self.telemetry is not None:
            self.telemetry.recorder.ejection(cluster.config.name)

    def _count_overflow(self, cluster: ClusterState) -> None:
        if self.telemetry is not None:
            self.telemetry.recorder.overflow(cluster.config.name)

    async def _exchange(self, c: _Downstream, head: RequestHead, head_bytes: bytes,
                        body: bytes | None, cluster: ClusterState, ep: Endpoint,
                        route_timeout: float) -> _Failure | tuple[UpstreamConn, ResponseHead]:
        fresh = False
        while True:
            c.upstream_partial = c.body_unread = False
            # A streamed body cannot be sent again: no stale connection for it.
            pooled = None if fresh else self.pool.take_idle(ep, body is None)
            try:
                if pooled is not None:
                    conn, reused = pooled, True
                else:
                    conn, reused = await self.pool.acquire(ep, cluster, fresh)
            except ConnectFailed as exc:
                return _Failure(503, F.UPSTREAM_CONNECT_FAILURE, str(exc), "connect-failure")
            except Overflow as exc:
                return _Failure(503, F.UPSTREAM_OVERFLOW,
                                f"cluster {cluster.config.name!r}: {exc}", None)
            if not reused:
                self.stats.upstream_connections += 1
            try:
                try:
                    if body is not None:
                        await conn.io.send_all(head_bytes + body if body else head_bytes)
                    else:
                        await conn.io.send_all(head_bytes)
                        # A long upload gets stream_timeout; the route timeout then covers
                        # the wait for the response.
                        limits = self._runtime().limits
                        c.scope.deadline = trio.current_time() + limits.stream_timeout
                        if not await self._stream_request_body(c, conn, head.chunked):
                            c.upstream_partial = c.body_unread = True
                        c.scope.deadline = trio.current_time() + route_timeout
                except _IO_ERRORS:
                    # The upstream may have answered early and closed (e.g. 413 before
                    # reading the body): the kernel keeps what it sent readable after
                    # the reset, so look for an answer before calling it a reset. (A
                    # stale pooled connection reads as nothing: retried below.)
                    c.upstream_partial = True
                    c.body_unread = body is None
                resp = await self._read_head(c, conn, head)
                return conn, resp
            except ProtocolError as exc:
                conn.close()
                if exc.flag == F.DOWNSTREAM_PROTOCOL_ERROR:
                    raise
                return _Failure(502, exc.flag, f"{exc.reason} from {ep}", None)
            except (*_IO_ERRORS, _UpstreamClosed) as exc:
                conn.close()
                no_bytes = not isinstance(exc, _UpstreamClosed) or exc.no_bytes
                if reused and body is not None and no_bytes:
                    fresh = True  # a stale pooled connection: once more on a new one
                    continue
                return _Failure(503, F.UPSTREAM_RESET, f"connection to {ep} reset", "reset")
            except BaseException:
                conn.close()
                raise

    async def _stream_request_body(self, c: _Downstream, conn: UpstreamConn,
                                   chunked: bool) -> bool:
        """Send the body as the client sends it. Return False if the upstream spoke (an
        early answer, or a close) before the whole body was sent."""
        if await _send_queued_body(c, conn, chunked):
            return True  # the whole body came with the head
        sock = socket_stream(conn.stream)
        if sock is None or not isinstance(conn.io, FastSocket):
            # TLS: a readable socket may only be a session ticket, not an answer. An early
            # answer is still seen when the upstream's close makes a send fail.
            while True:
                await c.recv_into_reader()
                await trio.lowlevel.checkpoint()  # a fast client could otherwise hog the loop
                if await _send_queued_body(c, conn, chunked):
                    return True
        # While waiting for the client's next bytes, the upstream may answer (e.g. 413)
        # and stop reading: one watcher task per streamed body (not per request) notices.
        answered = False
        error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                nonlocal answered
                await trio.lowlevel.wait_readable(sock.socket)
                answered = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                while True:
                    await c.recv_into_reader()
                    await trio.lowlevel.checkpoint()  # a fast client could otherwise hog the loop
                    if await _send_queued_body(c, conn, chunked):
                        break
            except Exception as exc:
                # Raised outside the nursery, so that callers see it bare, not in a group.
                error = exc
            nursery.cancel_scope.cancel()
        if answered:
            return False
        if error is not None:
            raise error
        return True

    async def _read_head(self, c: _Downstream, conn: UpstreamConn,
                         head: RequestHead) -> ResponseHead:
        reader = conn.reader
        if head.method == b"HEAD":
            reader.expect_head_response()
        events = reader.events
        got_bytes = False
        while True:
            while not events:
                data = await conn.wait_recv(RECV)
                if not data:
                    raise _UpstreamClosed(not got_bytes)
                got_bytes = True
                reader.feed(bytes(data))
            kind, value = events.popleft()
            if kind != HEAD:
                raise ProtocolError(502, F.UPSTREAM_PROTOCOL_ERROR, "unexpected upstream data")
            assert isinstance(value, ResponseHead)
            if 100 <= value.status < 200 and value.status != 101:
                if events and events[0][0] == END:
                    events.popleft()
                continue  # 100 Continue was already sent by us; drop interim responses
            return value

    # --- responses --------------------------------------------------------------------

    async def _respond(self, c: _Downstream, head: RequestHead, conn: UpstreamConn,
                       resp: ResponseHead, cluster: ClusterState) -> bool:
        reader = conn.reader
        events = reader.events
        status = resp.status
        no_body = head.method == b"HEAD" or status in (204, 304)
        until_close = not no_body and resp.content_length is None and not resp.chunked \
            and status != 101
        http11 = head.version == "1.1"
        if no_body or resp.content_length is not None or status == 101:
            framing = FRAME_NONE
        elif http11:
            framing = FRAME_CHUNKED
        else:
            framing = FRAME_CLOSE
        # body_unread: the rest of the request body would be read as the next request.
        keep = head.keep_alive and framing != FRAME_CLOSE and not head.upgrade \
            and not c.body_unread
        self.stats.responses[(self.listener, status)] += 1
        c.responded = True
        c.status = status
        c.phase = STREAMING
        out = [response_head_bytes(resp, framing, keep)]
        done = False
        trailers: list[tuple[bytes, bytes]] | None = None
        long_body = False
        upgraded = b""
        try:
            while True:
                while events:
                    kind, value = events.popleft()
                    if kind == BODY:
                        assert isinstance(value, bytes)
                        c.tx += len(value)
                        out.append(encode_chunk(value) if framing == FRAME_CHUNKED else value)
                    elif kind == END:
                        trailers = value  # type: ignore[assignment]
                        done = True
                        break
                    elif kind == UPGRADE:
                        assert isinstance(value, bytes)
                        upgraded = value
                        done = True
                        break
                if status == 101 and not done:
                    done = True  # no UPGRADE event: nothing after the head yet
                if done:
                    if framing == FRAME_CHUNKED:
                        out.append(last_chunk(trailers) if trailers else LAST_CHUNK)
                    await c.io.send_all(b"".join(out))
                    break
                await c.io.send_all(b"".join(out) if len(out) > 1 else out[0])
                out = []
                if not long_body:
                    # The route timeout covered the wait for the head; a long body gets
                    # its own, longer limit.
                    long_body = True
                    c.scope.deadline = (trio.current_time()
                                        + self._runtime().limits.stream_timeout)
                data = await conn.io.receive_some(RECV)
                await trio.lowlevel.checkpoint()  # a fast upstream could otherwise hog the loop
                if not data:
                    if until_close:
                        done = True
                        continue
                    # Truncated upstream body: the client must see a broken message.
                    conn.close()
                    return False
                reader.feed(bytes(data))
        except ProtocolError:
            conn.close()
            return False
        except BaseException:
            conn.close()
            raise
        if status == 101:
            await self._tunnel(c, conn, upgraded)
            return False
        conn.requests += 1
        if (resp.keep_alive and not until_close and not events and not head.upgrade
                and not c.upstream_partial):
            if head.method == b"HEAD":
                conn.reader = type(reader)()  # llhttp cannot reuse a parser after HEAD
            self.pool.release(conn, cluster.config.circuit_breaker.max_requests_per_connection)
        else:
            conn.close()
        return keep

    async def _tunnel(self, c: _Downstream, conn: UpstreamConn, upstream_rest: bytes) -> None:
        c.phase = TUNNEL
        c.scope.deadline = math.inf
        try:
            events = c.reader.events
            while events:
                kind, value = events.popleft()
                if kind == UPGRADE and isinstance(value, bytes) and value:
                    await conn.io.send_all(value)
            if upstream_rest:
                await c.io.send_all(upstream_rest)
            await splice(c.stream, conn.stream,
                         idle_timeout=self._runtime().limits.tunnel_idle_timeout)
        finally:
            conn.close()

    async def _local(self, c: _Downstream, head: RequestHead, rid: bytes, status: int,
                     flag: str, reason: str, keep: bool = True) -> bool:
        # Callers pass keep=False when the request body was not read: it would be
        # taken for the next request.
        keep = keep and head.keep_alive and not head.upgrade
        self._count_local(status, flag)
        c.responded = True
        c.status, c.flag = status, flag
        data = local_response(status, flag, reason, rid, keep, head_only=head.method == b"HEAD")
        c.tx = len(data)
        await c.io.send_all(data)
        return keep


async def _send_queued_body(c: _Downstream, conn: UpstreamConn, chunked: bool) -> bool:
    """Send the body bytes parsed so far; return True once the body's END was sent."""
    events = c.reader.events
    send = conn.io.send_all
    while events:
        kind, value = events.popleft()
        if kind == BODY:
            assert isinstance(value, bytes)
            await send(encode_chunk(value) if chunked else value)
        elif kind == END:
            if chunked:
                await send(last_chunk(value))  # type: ignore[arg-type]
            return True
    return False


def _add_flag(resp: ResponseHead, flag: str) -> None:
    """Add a flag to the response's x-mesh-flags (after an upstream sidecar's own)."""
    headers = resp.headers
    for i, (k, v) in enumerate(headers):
        if k == b"x-mesh-flags":
            headers[i] = (k, v + b"," + flag.encode())
            return
    headers.append((b"x-mesh-flags", flag.encode()))


class _UpstreamClosed(Exception):
    def __init__(self, no_bytes: bool) -> None:
        super().__init__("upstream closed the connection")
        self.no_bytes = no_bytes
