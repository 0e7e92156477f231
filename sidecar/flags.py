"""Response flags: the short code on every reply the sidecar makes itself.

Sent as `x-mesh-flags` with a human `x-mesh-reason`; several flags are joined with a
comma (`UF,URX`). Codes follow Envoy's where one exists. docs/sidecar.md lists them.
"""

NO_HEALTHY_UPSTREAM = "UH"
UPSTREAM_CONNECT_FAILURE = "UF"
UPSTREAM_TIMEOUT = "UT"
UPSTREAM_OVERFLOW = "UO"  # a circuit breaker is open
UPSTREAM_RESET = "UR"
UPSTREAM_PROTOCOL_ERROR = "UPE"
FAULT_ABORT = "FI"
FAULT_DELAY = "DI"
RETRY_EXHAUSTED = "URX"  # attempts or the retry budget ran out
NO_ROUTE = "NR"
DENIED = "DENY"  # reserved for authorization (identity issue)
DOWNSTREAM_PROTOCOL_ERROR = "DPE"
DOWNSTREAM_TIMEOUT = "DT"
