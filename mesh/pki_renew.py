"""When to renew an SVID, and how long to wait after a failed renewal. Pure arithmetic.

Renewal happens at about half the lifetime (SPIRE and Istio do the same), with jitter so a
fleet issued at the same moment (a CA restart, a rotation) does not come back at the same
moment. After a failure the sidecar retries with exponential backoff and full jitter, never
waiting so long that the certificate could expire before the next attempt.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

__all__ = ["RENEW_AT", "RENEW_JITTER", "renewal_time", "retry_delay"]

RENEW_AT = 0.5  # fraction of the lifetime
RENEW_JITTER = 0.1  # +/- fraction of the lifetime: renew between 40 % and 60 %

_rng = random.SystemRandom()


def renewal_time(
    not_before: datetime,
    not_after: datetime,
    *,
    rng: random.Random | None = None,
    at: float = RENEW_AT,
    jitter: float = RENEW_JITTER,
) -> datetime:
    """The moment to start renewing a certificate valid from ``not_before`` to ``not_after``.

    Uniform in ``[at - jitter, at + jitter]`` of the lifetime. ``rng`` makes tests exact.
    """
    if not 0.0 <= jitter <= at < 1.0 or at + jitter >= 1.0:
        raise ValueError(f"renewal fraction {at}±{jitter} must stay within (0, 1)")
    lifetime = (not_after - not_before).total_seconds()
    fraction = (rng or _rng).uniform(at - jitter, at + jitter)
    return not_before + timedelta(seconds=lifetime * fraction)


def retry_delay(
    attempt: int,
    *,
    time_left: float,
    base: float = 0.5,
    cap: float = 30.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before renewal attempt ``attempt`` (1 = first retry).

    Exponential with full jitter (AWS-style), capped at ``cap`` and at a quarter of the
    certificate's remaining life, so several more attempts fit before it expires.
    Never below 50 ms, so a tight failure loop cannot spin.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    ceiling = min(cap, base * 2 ** min(attempt - 1, 30), max(time_left, 0.0) / 4)
    return max(0.05, (rng or _rng).uniform(0.0, ceiling))
