"""Every NATS subject the mesh uses. Nobody writes a subject string anywhere else.

Subjects are dot-separated tokens. Names that come from users (services,
instances) are checked by `token()` so a dot or a wildcard in a name cannot
widen a subscription.
"""

from __future__ import annotations

import re

from mesh.errors import ConfigError

PREFIX = "mesh"

# Control plane liveness: any replica answers (queue group), request/reply.
PING = f"{PREFIX}.ping"
PING_QUEUE = "controlplane"

# Actor lifecycle events (started, crashed, restarted), one subject per replica.
LIFECYCLE_ALL = f"{PREFIX}.lifecycle.>"

# JetStream key-value buckets.
KV_LEASES = "mesh_leases"
KV_CONFIG = "mesh_config"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def token(name: str) -> str:
    """Check one subject token taken from a user-supplied name."""
    if not _TOKEN.match(name):
        raise ConfigError(
            f"{name!r} cannot be used in a NATS subject: use letters, digits, '-' and '_' only"
        )
    return name


def lifecycle(replica: str) -> str:
    return f"{PREFIX}.lifecycle.{token(replica)}"
