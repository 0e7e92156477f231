"""The floor of an HTTP/1.1 proxy in Python on trio: what bench/dataplane.py compares
the sidecar with, to tell the cost of the language and the event loop from our own.

It does the least a keep-alive proxy can do: one task per client connection, one pooled
upstream connection per client connection, non-blocking reads and writes straight on
the fd (trio waits only on EAGAIN, like sidecar/fastio.py), one write per message, no
parsing beyond finding the end of the head and Content-Length, no routing, headers,
retries, timeouts or telemetry. Not a usable proxy (no chunked bodies, no pipelining).

    python bench/floor_proxy.py UPSTREAM_PORT   # prints {"event": "ready", "port": N}
"""

from __future__ import annotations

import json
import os
import socket
import sys

import trio

RECV = 65536


async def read_message(fd: int, buf: bytearray) -> bool:
    """Read into `buf` until it holds one whole message (head + Content-Length body)."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            length = 0
            i = buf.find(b"\ncontent-length:", 0, end)
            if i < 0:
                i = buf.find(b"\nContent-Length:", 0, end)
            if i >= 0:
                j = buf.find(b"\r", i + 16)
                length = int(buf[i + 16:j])
            if len(buf) >= end + 4 + length:
                return True
        try:
            data = os.read(fd, RECV)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        if not data:
            return False
        buf += data


async def write(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)


async def serve(client: trio.SocketStream, upstream_port: int) -> None:
    up = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    for s in (client, up):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    cfd, ufd = client.socket.fileno(), up.socket.fileno()
    req, resp = bytearray(), bytearray()
    try:
        while await read_message(cfd, req):
            await write(ufd, req)
            req.clear()
            if not await read_message(ufd, resp):
                return
            await write(cfd, resp)
            resp.clear()
    except OSError:
        pass
    finally:
        up.socket.close()
        client.socket.close()


async def main(upstream_port: int) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=1024)
    port = listeners[0].socket.getsockname()[1]
    print(json.dumps({"event": "ready", "outbound": port}), flush=True)

    async def handler(stream: trio.SocketStream) -> None:
        await serve(stream, upstream_port)

    await trio.serve_listeners(handler, listeners)


if __name__ == "__main__":
    try:
        trio.run(main, int(sys.argv[1]))
    except KeyboardInterrupt:
        pass
