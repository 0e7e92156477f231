"""Identity core, one import for callers: ``from mesh import pki``.

Pure and I/O-free (except ``pki_tls``, which hands key material to OpenSSL in memory). The
modules behind it, one job each:

* ``mesh.spiffe``      SPIFFE ID parse/format/validate
* ``mesh.pki_ca``      CA: generate a root, load an operator root/intermediate, sign CSRs
* ``mesh.pki_csr``     sidecar key + CSR; CA-side CSR checks; renewal proofs
* ``mesh.pki_svid``    ``IssuedSvid`` (certs, travels on the bus) and ``Svid`` (+ private key)
* ``mesh.pki_bundle``  ``TrustBundle``: roots of a trust domain, PEM in/out, rotation overlap
* ``mesh.pki_verify``  chain verification with typed refusals; post-handshake leaf check
* ``mesh.pki_tls``     ``ssl.SSLContext`` for server (STRICT/PERMISSIVE) and client
* ``mesh.pki_renew``   renewal time (half life, jitter) and retry backoff
* ``mesh.pki_seal``    CA key sealed under an operator secret, for the standby CA
* ``mesh.pki_errors``  the typed refusals, each with a ``reason`` flag
* ``mesh.tokens``      bootstrap join tokens (separate import: ``from mesh import tokens``)
"""

from __future__ import annotations

from mesh.pki_bundle import TrustBundle, fingerprint, is_ca_certificate
from mesh.pki_ca import (
    CLOCK_SKEW,
    DEFAULT_LEAF_TTL,
    DEFAULT_ROOT_TTL,
    MIN_LEAF_TTL,
    CertificateAuthority,
    generate_intermediate,
    generate_root,
    load_ca,
)
from mesh.pki_csr import (
    ALLOWED_CURVES,
    build_csr,
    check_csr,
    generate_key,
    load_csr,
    renewal_proof,
    verify_renewal,
)
from mesh.pki_errors import (
    BadChain,
    CaLoadError,
    CertExpired,
    CertificateRefused,
    CertNotYetValid,
    CsrBadSignature,
    CsrKeyNotAllowed,
    CsrMalformed,
    CsrRefused,
    CsrWrongIdentity,
    IdentityError,
    NotAnSvid,
    RenewalProofInvalid,
    SealError,
    SpiffeIdError,
    UnknownIssuer,
    WrongIdentity,
    WrongTrustDomain,
    refusal_from_reason,
)
from mesh.pki_renew import renewal_time, retry_delay
from mesh.pki_seal import seal, seal_ca, unseal, unseal_ca
from mesh.pki_svid import IssuedSvid, Svid
from mesh.pki_tls import (
    classify_tls_failure,
    client_context,
    handshake_and_check,
    load_svid_into,
    server_context,
)
from mesh.pki_verify import check_peer_leaf, spiffe_id_of, verify_svid
from mesh.spiffe import SpiffeId, parse_spiffe_id

__all__ = [
    "ALLOWED_CURVES",
    "CLOCK_SKEW",
    "DEFAULT_LEAF_TTL",
    "DEFAULT_ROOT_TTL",
    "MIN_LEAF_TTL",
    "BadChain",
    "CaLoadError",
    "CertExpired",
    "CertNotYetValid",
    "CertificateAuthority",
    "CertificateRefused",
    "CsrBadSignature",
    "CsrKeyNotAllowed",
    "CsrMalformed",
    "CsrRefused",
    "CsrWrongIdentity",
    "IdentityError",
    "IssuedSvid",
    "NotAnSvid",
    "RenewalProofInvalid",
    "SealError",
    "SpiffeId",
    "SpiffeIdError",
    "Svid",
    "TrustBundle",
    "UnknownIssuer",
    "WrongIdentity",
    "WrongTrustDomain",
    "build_csr",
    "check_csr",
    "check_peer_leaf",
    "classify_tls_failure",
    "client_context",
    "fingerprint",
    "generate_intermediate",
    "generate_key",
    "generate_root",
    "handshake_and_check",
    "is_ca_certificate",
    "load_ca",
    "load_csr",
    "load_svid_into",
    "parse_spiffe_id",
    "refusal_from_reason",
    "renewal_proof",
    "renewal_time",
    "retry_delay",
    "seal",
    "seal_ca",
    "server_context",
    "spiffe_id_of",
    "unseal",
    "unseal_ca",
    "verify_renewal",
    "verify_svid",
]
