"""Real CAs and certificates for the identity tests (no mocks: every signature is real)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pki_helpers import NOW, TD

from mesh import pki
from mesh.spiffe import SpiffeId


@pytest.fixture(scope="session")
def ca() -> pki.CertificateAuthority:
    # Back-dated so tests can issue certificates that already expired.
    return pki.generate_root(TD, now=NOW - timedelta(days=10))


@pytest.fixture(scope="session")
def other_ca() -> pki.CertificateAuthority:
    return pki.generate_root("other.org", now=NOW - timedelta(days=10))


@pytest.fixture(scope="session")
def checkout() -> SpiffeId:
    return SpiffeId(TD, "shop", "checkout")


@pytest.fixture(scope="session")
def inventory() -> SpiffeId:
    return SpiffeId(TD, "shop", "inventory")
