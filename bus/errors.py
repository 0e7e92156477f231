"""Bus errors. Each message says what failed and on which subject or server."""

from mesh.errors import BusError


class BusConnectError(BusError):
    pass


class BusTimeout(BusError):
    pass


class NoResponders(BusError):
    pass


class BusClosed(BusError):
    pass


class BusOverloaded(BusError):
    """The outgoing queue is full: NATS is slower than the publishers."""


class KVConflict(BusError):
    """create() found the key present, or update() saw another revision."""


class KVError(BusError):
    pass


class BusPermissionError(BusError):
    """The server refused a publish or subscription for this connection's NATS user."""


class BusOutsideConnect(BusError):
    """A call that has to reach nats-py came from a trio task started outside the
    `async with connect(...)` block of its bus, so it cannot reach the bus's trio-asyncio
    loop."""
