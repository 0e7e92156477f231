"""The mirror layer on its own: the shadow Host, the in-flight bound, what is skipped, and
that failures are counted and never raised."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import pytest
import trio

from mesh.snapshot import Cluster, Endpoint
from mesh.snapshot import Mirror as MirrorConfig
from sidecar.cluster import ClusterState
from sidecar.http.codec import RequestHead
from sidecar.mirror import Mirror, shadow_host
from sidecar.pool import Pool
from sidecar.stats import Stats


@pytest.mark.parametrize(("host", "shadow"), [
    (b"reviews", b"reviews-shadow"),
    (b"reviews:9080", b"reviews-shadow:9080"),
    (b"[::1]:80", b"[::1]-shadow:80"),
    (b"", b"-shadow"),
])
def test_shadow_host(host: bytes, shadow: bytes) -> None:
    assert shadow_host(host) == shadow


@pytest.fixture
def hole() -> Iterator[int]:
    """A port that accepts connections (backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def _head() -> RequestHead:
    return RequestHead(method=b"GET", target=b"/x", version="1.1",
                       headers=[(b"host", b"reviews")], keep_alive=True, upgrade=False,
                       chunked=False, content_length=None)


async def test_copies_are_bounded_skipped_and_failures_counted(hole: int) -> None:
    cluster = ClusterState(Cluster(name="c", subsets=(("v2", (Endpoint("127.0.0.1", hole),)),)),
                           random.Random(1), time.monotonic)
    stats = Stats()
    m = Mirror(Pool(), stats, random.Random(1), max_in_flight=2)
    config = MirrorConfig(cluster="c", subset="v2")
    m.maybe_send(config, cluster, _head(), [], frozenset(), b"", 0.2)
    assert stats.mirror_skipped["unavailable"] == 1  # not started yet: skipped, no error
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        for _ in range(5):
            m.maybe_send(config, cluster, _head(), [], frozenset(), b"", 0.2)
        assert (stats.mirrored, stats.mirror_skipped["busy"]) == (2, 3)
        m.maybe_send(config, cluster, _head(), [], frozenset(), None, 0.2)
        assert stats.mirror_skipped["body"] == 1
        m.maybe_send(MirrorConfig(cluster="c", subset="v2", percent=0), cluster, _head(), [],
                     frozenset(), b"", 0.2)
        assert stats.mirrored == 2
        with trio.fail_after(5):
            while m.in_flight:
                await trio.sleep(0.01)
        assert stats.mirror_failed == 2  # both timed out, nothing raised
        nursery.cancel_scope.cancel()
