"""LogThrottle: a few lines per key per window, and the count of the ones held back."""

from __future__ import annotations

import pytest

from mesh.logthrottle import MAX_KEYS, LogThrottle, held_note


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_held_then_reported() -> None:
    clock = Clock()
    t = LogThrottle(burst=3, window=10.0, clock=clock)
    assert [t.allow("plaintext") for _ in range(5)] == [
        (True, 0), (True, 0), (True, 0), (False, 0), (False, 0)]
    # Another key has its own budget.
    assert t.allow("expired") == (True, 0)
    clock.now += 9.9
    assert t.allow("plaintext") == (False, 0)
    clock.now += 0.2
    # A new window: the first line tells how many were held back since the last one.
    assert t.allow("plaintext") == (True, 3)
    assert t.allow("plaintext") == (True, 0)
    assert held_note(3) == " (3 similar lines not logged)" and held_note(0) == ""


def test_keys_are_bounded() -> None:
    t = LogThrottle(burst=1, clock=Clock())
    for i in range(MAX_KEYS + 10):
        assert t.allow(i) == (True, 0)
    assert len(t._keys) == MAX_KEYS
    # The oldest keys were forgotten, so they start a fresh budget.
    assert t.allow(0) == (True, 0)


def test_bad_settings_refused() -> None:
    with pytest.raises(ValueError, match="burst"):
        LogThrottle(burst=0)
    with pytest.raises(ValueError, match="window"):
        LogThrottle(window=0)
