"""Fixtures for control-plane tests (helpers live in cp_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cp_helpers import Mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = Mesh(tmp_path_factory.mktemp("mesh"))
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
