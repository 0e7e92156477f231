from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from mesh import pki


def test_renewal_at_about_half_life_with_jitter() -> None:
    nb = datetime(2026, 1, 1, tzinfo=UTC)
    na = nb + timedelta(hours=24)
    rng = random.Random(7)
    times = [pki.renewal_time(nb, na, rng=rng) for _ in range(500)]
    assert all(nb + timedelta(hours=9.6) <= t <= nb + timedelta(hours=14.4) for t in times)
    assert len(set(times)) > 400  # jittered, not all at once
    mean = sum((t - nb).total_seconds() for t in times) / len(times)
    assert abs(mean - 12 * 3600) < 1800
    with pytest.raises(ValueError):
        pki.renewal_time(nb, na, at=0.9, jitter=0.2)


def test_retry_backoff_grows_and_respects_time_left() -> None:
    rng = random.Random(1)
    assert all(0.05 <= pki.retry_delay(1, time_left=3600, rng=rng) <= 0.5 for _ in range(100))
    assert max(pki.retry_delay(6, time_left=3600, rng=rng) for _ in range(200)) > 8
    assert all(pki.retry_delay(20, time_left=3600, rng=rng) <= 30 for _ in range(100))
    # Only 20 s left: never wait more than 5 s.
    assert all(pki.retry_delay(20, time_left=20, rng=rng) <= 5 for _ in range(100))
    assert pki.retry_delay(3, time_left=-5, rng=rng) == 0.05
