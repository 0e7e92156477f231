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

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")


def token(name: str) -> str:
    """Check one subject token taken from a user-supplied name."""
    if not _TOKEN.fullmatch(name):  # fullmatch: `$` alone accepts a trailing newline
        raise ConfigError(
            f"{name!r} cannot be used in a NATS subject: use letters, digits, '-' and '_' only"
        )
    return name


def lifecycle(replica: str) -> str:
    return f"{PREFIX}.lifecycle.{token(replica)}"


# Identity (actors/ca.py, sidecar/identity.py). Only the CA leader subscribes to CA_SIGN.
CA_SIGN = f"{PREFIX}.ca.sign"  # request/reply: CsrRequest -> CsrReply
CA_QUEUE = "ca"
CA_BUNDLE = f"{PREFIX}.ca.bundle"  # BundleAnnounce, on change and periodically
CA_BUNDLE_GET = f"{PREFIX}.ca.bundle-get"  # request/reply: BundleQuery -> BundleAnnounce
CA_COMMAND = f"{PREFIX}.ca.command"  # request/reply: CaCommand -> CaCommandReply
CERTS_QUERY = f"{PREFIX}.identity.query"  # CertsQuery, answered by every identity agent
KV_CA = "mesh_ca"  # sealed CA ("ca"), bundle ("bundle"), rotation state ("rotation")
KV_TOKENS = "mesh_tokens"  # join token records, hashed (mesh/tokens.py)


CERTS_STATUS_ALL = f"{PREFIX}.identity.status.*"  # every certs_inbox(nonce), for permissions


def certs_inbox(nonce: str) -> str:
    """Where identity agents send their IdentityStatus for one `mesh certs` run."""
    return f"{PREFIX}.identity.status.{token(nonce)}"


# Telemetry, traces, access logs (docs/telemetry.md).
# Sidecar batches: mesh.telemetry.<namespace>.<service>.<instance> (TelemetryBatch).
TELEMETRY_ALL = f"{PREFIX}.telemetry.>"
# Golden signals per pair: mesh.golden.<src>.<dst> (GoldenSummary), from every aggregator replica.
GOLDEN_ALL = f"{PREFIX}.golden.>"
# request/reply, answered by one aggregator replica: GraphQuery -> GraphReply.
GRAPH_QUERY = f"{PREFIX}.graph.query"
# Every aggregator replica answers GraphQuery here, to its reply_to (graph_replies(nonce)),
# so a client can pick the replica that has merged batches the longest.
GRAPH_SCATTER = f"{PREFIX}.graph.scatter"
TELEMETRY_QUEUE = "telemetry"
# Finished spans: mesh.spans.<service> (SpanRecord); request/reply TraceQuery -> TraceReply.
SPANS_ALL = f"{PREFIX}.spans.>"
TRACE_QUERY = f"{PREFIX}.trace.query"
# Access-log lines, when a sidecar is told to publish them: mesh.accesslog.<service>.
ACCESSLOG_ALL = f"{PREFIX}.accesslog.>"


def telemetry(namespace: str, service: str, instance: str) -> str:
    return f"{PREFIX}.telemetry.{token(namespace)}.{token(service)}.{token(instance)}"


def graph_replies(nonce: str) -> str:
    return f"{PREFIX}.graph.replies.{token(nonce)}"


def golden(src: str, dst: str) -> str:
    return f"{PREFIX}.golden.{token(src)}.{token(dst)}"


def spans(service: str) -> str:
    return f"{PREFIX}.spans.{token(service)}"


def accesslog(service: str) -> str:
    return f"{PREFIX}.accesslog.{token(service)}"


# Config sync (docs/sync.md). Requests go to whichever replica leads the config actor.
# What a sidecar sends carries its service and instance in the subject, not only in the body:
# NATS permissions can then bind a sidecar's user to its own service (bus/auth.py), and the
# config actor drops a message whose body names another service or instance than its subject
# (`config_sender`). The *_ALL patterns are what the control plane subscribes to.
CONFIG_FULL_ALL = f"{PREFIX}.config.full.*.*"  # request/reply: SnapshotRequest -> SnapshotPush
CONFIG_HEARTBEAT_ALL = f"{PREFIX}.config.heartbeat.*.*"  # publish: ConfigHeartbeat
CONFIG_ACK_ALL = f"{PREFIX}.config.ack.*.*"  # publish: ConfigAck
CONFIG_STATUS = f"{PREFIX}.config.status"  # request/reply: ConfigStatusRequest -> ConfigStatus
CONFIG_QUEUE = "config"
CONFIG_KEY = "resources"  # the one key in KV_CONFIG: the whole resource set per revision


CONFIG_PUSH_ALL = f"{PREFIX}.config.push.*"  # every config_push(service), for permissions


def config_push(service: str) -> str:
    """SnapshotPush for every sidecar of one service."""
    return f"{PREFIX}.config.push.{token(service)}"


def config_full(service: str, instance: str) -> str:
    """Where one sidecar asks for a full snapshot (and registers)."""
    return f"{PREFIX}.config.full.{token(service)}.{token(instance)}"


def config_heartbeat(service: str, instance: str) -> str:
    return f"{PREFIX}.config.heartbeat.{token(service)}.{token(instance)}"


def config_ack(service: str, instance: str) -> str:
    return f"{PREFIX}.config.ack.{token(service)}.{token(instance)}"


def config_sender(subject: str) -> tuple[str, str] | None:
    """(service, instance) named by a config_full/heartbeat/ack subject, None if it is not
    one: what the sender's NATS permissions vouch for."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[0] != PREFIX or parts[1] != "config":
        return None
    if parts[2] not in ("full", "heartbeat", "ack"):
        return None
    return parts[3], parts[4]


# --- permission patterns (bus/auth.py) ------------------------------------------------------
# The same subjects with a name left open: ANY is one NATS wildcard token. Only permissions
# use these; the builders above never accept a wildcard, so no caller can widen a subscription.
ANY = "*"


def _scope(name: str) -> str:
    return ANY if name == ANY else token(name)


def sidecar_publish(namespace: str, service: str, instance: str) -> tuple[str, ...]:
    """What one sidecar of `service` publishes that names it: its config requests, heartbeats
    and ACKs, its telemetry batches, spans and access-log lines. `namespace` and `instance`
    may be ANY; `service` may not (that is the broad role's business)."""
    ns, svc, inst = _scope(namespace), token(service), _scope(instance)
    return (
        f"{PREFIX}.config.full.{svc}.{inst}",
        f"{PREFIX}.config.heartbeat.{svc}.{inst}",
        f"{PREFIX}.config.ack.{svc}.{inst}",
        f"{PREFIX}.telemetry.{ns}.{svc}.{inst}",
        f"{PREFIX}.spans.{svc}",
        f"{PREFIX}.accesslog.{svc}",
    )
