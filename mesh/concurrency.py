"""Small helpers for structured concurrency.

trio wraps whatever leaves a nursery in an ExceptionGroup (strict groups). A
service that owns a nursery behind an `async with` should not change the type
of the error its caller's body raised, nor make every caller write `except*`
for the common case of one failure, so owners unwrap a group of one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def single_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The only leaf exception of a (possibly nested) group, or None if several."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


@contextmanager
def unwrap_single() -> Iterator[None]:
    """Re-raise a group holding exactly one exception as that exception."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = single_leaf(group)
        if leaf is None:
            raise
        raise leaf from None
