"""Opaque TCP: each accepted connection is spliced to one endpoint of a cluster subset."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from mesh.snapshot import TcpProxy
from sidecar.fastio import set_nodelay
from sidecar.runtime import Runtime
from sidecar.splice import splice

log = logging.getLogger("mesh.sidecar.tcp")


class TcpListener:
    def __init__(self, config: TcpProxy, runtime: Callable[[], Runtime]) -> None:
        self.name = config.name
        self._runtime = runtime

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            set_nodelay(stream)
            rt = self._runtime()
            config = next((t for t in rt.snapshot.tcp if t.name == self.name), None)
            if config is None:
                return  # removed by a reload; its port closes on restart
            cluster = rt.clusters[config.cluster]
            ep = cluster.pick(config.subset, None)
            if ep is None:
                log.warning("tcp %s: no healthy endpoint", self.name)
                return
            try:
                with trio.fail_after(cluster.config.connect_timeout):
                    upstream = await trio.open_tcp_stream(ep.host, ep.port)
            except (OSError, trio.TooSlowError):
                cluster.outlier.on_failure(ep)
                log.warning("tcp %s: connect to %s failed", self.name, ep)
                return
            cluster.outlier.on_success(ep)
            set_nodelay(upstream)
            try:
                await splice(stream, upstream)
            finally:
                upstream.socket.close()
        except Exception:
            log.exception("tcp %s: unexpected error", self.name)
        finally:
            stream.socket.close()
