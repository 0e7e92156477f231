"""Hold a lease in a separate process until killed: `python lease_holder.py NATS_URL NAME HOLDER TTL`."""

from __future__ import annotations

import json
import sys

import trio

from actors.lease import Lease, LeaseTerm, open_leases
from bus.client import connect


async def main(url: str, name: str, holder: str, ttl: float) -> None:
    async with connect(url) as bus:
        lease = Lease(await open_leases(bus), name, holder, ttl=ttl)

        async def lead(term: LeaseTerm) -> None:
            print(json.dumps({"event": "ready", "holder": holder}), flush=True)
            try:
                await trio.sleep_forever()
            finally:
                print(json.dumps({"event": "stopped", "valid": term.valid()}), flush=True)

        await lease.run_as_leader(lead)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
