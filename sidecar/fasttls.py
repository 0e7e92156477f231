"""TLS on a plain socket without trio.SSLStream's per-call machinery.

trio.SSLStream runs every read and write through a lock, a conflict detector and at least one
scheduler round trip; on the proxy path that is most of what mTLS costs. `FastTLS` drives an
`ssl.SSLObject` over two `MemoryBIO`s itself and moves the bytes with the same non-blocking
`os.read`/`os.write` first, `wait_readable`/`wait_writable` only on EAGAIN, as
`fastio.FastSocket`. Like FastSocket, a call that completes at once is not a checkpoint: the
proxy checkpoints explicitly where a loop could otherwise never wait.

Concurrency: one reader and one writer task at a time (a tunnel pumps both ways). Encrypted
bytes leave through one flusher at a time (a second one waits for it), which drains the
outgoing BIO until it is empty, so records are never reordered and writers keep the socket's
back-pressure.

Failures: TLS errors come out as `trio.BrokenResourceError` whose cause is the `ssl` error,
so `pki.classify_tls_failure` reads them like trio's.
"""

from __future__ import annotations

import contextlib
import os
import ssl

import trio

__all__ = ["FastTLS"]

_RECV = 65536


class FastTLS(trio.abc.HalfCloseableStream):
    __slots__ = ("_flushed", "_flushing", "_in", "_obj", "_out", "_sock", "transport_stream")

    def __init__(self, stream: trio.SocketStream, context: ssl.SSLContext, *,
                 server_side: bool) -> None:
        self.transport_stream = stream
        self._sock = stream.socket
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=None)
        self._flushing = False
        self._flushed: trio.Event | None = None  # created only when a second flusher waits

    # -- raw bytes ------------------------------------------------------------------------------

    async def _flush(self) -> None:
        while self._flushing:
            # One flusher at a time (records must not interleave); wait for it rather than
            # return, so a writer still gets back-pressure from the socket.
            if self._flushed is None:
                self._flushed = trio.Event()
            await self._flushed.wait()
        self._flushing = True
        try:
            while True:
                data = self._out.read()
                if not data:
                    return
                view = memoryview(data)
                while view:
                    try:
                        n = os.write(self._sock.fileno(), view)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(self._sock)
                        continue
                    view = view[n:]
        finally:
            self._flushing = False
            if self._flushed is not None:
                self._flushed.set()
                self._flushed = None

    async def _fill(self, wait_first: bool = False) -> bool:
        """Read encrypted bytes into the incoming BIO; False at EOF."""
        if wait_first:
            await trio.lowlevel.wait_readable(self._sock)
        while True:
            try:
                data = os.read(self._sock.fileno(), _RECV)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
                continue
            if not data:
                self._in.write_eof()
                return False
            self._in.write(data)
            return True

    # -- TLS ------------------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        try:
            while True:
                try:
                    self._obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._flush()
                    if not await self._fill():
                        raise trio.BrokenResourceError("peer closed during the TLS handshake"
                                                       ) from None
            await self._flush()
        except ssl.SSLError as exc:
            self._send_alert_nowait()
            raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc

    def _send_alert_nowait(self) -> None:
        """Best effort: let the peer read why (e.g. `unknown ca`) instead of a bare close."""
        data = self._out.read()
        if data and not self._flushing:
            with contextlib.suppress(OSError):
                os.write(self._sock.fileno(), data)

    def getpeercert(self, binary_form: bool = True) -> bytes | None:
        return self._obj.getpeercert(binary_form=True)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._receive(max_bytes or _RECV, False)

    async def receive_after_wait(self, max_bytes: int = _RECV) -> bytes:
        """For reads rarely ready at once (see FastSocket.receive_after_wait)."""
        return await self._receive(max_bytes, True)

    async def _receive(self, n: int, wait_first: bool) -> bytes:
        if not self._in.pending and not self._obj.pending():
            # Nothing buffered: read the socket first rather than fail a TLS read.
            await self._fill(wait_first)  # at EOF the BIO's EOF ends the read below
        while True:
            try:
                return self._obj.read(n)
            except ssl.SSLWantReadError:
                if self._out.pending:
                    await self._flush()
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._obj.write(data)  # a memory BIO takes everything at once
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        await self._flush()

    async def send_eof(self) -> None:
        """Half-close: send close_notify and keep reading. TLS 1.3 lets the peer go on
        sending after it (OpenSSL reads on after unwrap), so opaque TCP over mTLS can pass a
        client's shutdown(SHUT_WR) on, as a plain socket does (sidecar/splice.py)."""
        try:
            self._obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # the peer's close_notify comes later, or never: reading goes on
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    async def aclose(self) -> None:
        self._sock.close()
        await trio.lowlevel.checkpoint()
