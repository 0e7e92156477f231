"""Bootstrap join tokens: one token lets a sidecar obtain its *first* SVID for one identity.

Design: random tokens, stored hashed (not HMAC-signed tokens). Why:

* Replay protection needs state anyway (a use count), so the stateless advantage of an HMAC
  token disappears; with a stored record the same lookup gives the use count, expiry,
  revocation (``mesh token revoke`` deletes or flags the record) and listing.
* No CA-side signing secret to protect, rotate and hand to the standby CA: the records live in
  JetStream KV, which both CA replicas already read.
* A leaked KV entry does not leak a usable token: only SHA-256 of a 256-bit random secret is
  stored. A fast hash is right here because the secret is random, not a password.

Token text: ``tmj1.<id>.<secret>`` -- ``id`` (16 hex chars) is the public lookup key shown by
``mesh token list``; ``secret`` is 32 random bytes, base64url. The ``tmj1`` prefix lets secret
scanners recognize leaked tokens.

Replay: a token allows ``max_uses`` redemptions (default 1). Redeeming is a compare-and-set on
the record (``TokenStore.put`` with the revision read), so two CA replicas racing on one token
cannot both count the last use. A retry of the *same* request (same CSR public key) does not
use up another redemption: re-issuing a certificate for a key the requester already holds gives
a replaying eavesdropper nothing, and it makes a lost CA reply safely retryable.
Renewals do not use tokens: they are proven with the current SVID (``mesh.pki_csr``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mesh.pki_errors import (
    TokenExpired,
    TokenMalformed,
    TokenRefused,
    TokenReplayed,
    TokenRevoked,
    TokenUnknown,
    TokenWrongIdentity,
)
from mesh.spiffe import SpiffeId

__all__ = [
    "DEFAULT_TOKEN_TTL",
    "MemoryTokenStore",
    "TokenRecord",
    "TokenStore",
    "check_token",
    "issue_token",
    "key_fingerprint",
    "parse_token",
    "redeem_token",
    "revoke_token",
]

PREFIX = "tmj1"
DEFAULT_TOKEN_TTL = timedelta(hours=24)
_ID_BYTES = 8
_SECRET_BYTES = 32
_MAX_CAS_ATTEMPTS = 8


def _hash_secret(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def key_fingerprint(public_key: PublicKeyTypes) -> str:
    """SHA-256 of the SubjectPublicKeyInfo: names the CSR key a token was redeemed for."""
    der = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    """What the CA stores (KV key: ``token_id``). Contains no usable secret."""

    token_id: str
    secret_sha256: str
    trust_domain: str
    namespace: str
    service_account: str
    created_at: float  # unix seconds, UTC
    expires_at: float
    max_uses: int = 1
    uses: int = 0
    revoked: bool = False
    bound_keys: tuple[str, ...] = field(default_factory=tuple)

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account)

    def expires(self) -> datetime:
        return datetime.fromtimestamp(self.expires_at, UTC)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TokenRecord:
        try:
            raw: dict[str, Any] = json.loads(data)
            raw["bound_keys"] = tuple(raw.get("bound_keys", ()))
            return cls(**raw)
        except (ValueError, TypeError) as exc:
            raise TokenRefused(f"stored token record is corrupt: {exc}") from None


def issue_token(
    identity: SpiffeId,
    *,
    ttl: timedelta = DEFAULT_TOKEN_TTL,
    max_uses: int = 1,
    now: datetime | None = None,
) -> tuple[str, TokenRecord]:
    """Make a token for ``identity``: returns (token text for the operator, record to store).

    The token text is shown once and never stored.
    """
    if max_uses < 1:
        raise ValueError("max_uses must be at least 1")
    if ttl <= timedelta(0):
        raise ValueError("token ttl must be positive")
    if now is None:
        now = datetime.now(UTC)
    token_id = secrets.token_hex(_ID_BYTES)
    secret = secrets.token_bytes(_SECRET_BYTES)
    text = f"{PREFIX}.{token_id}.{base64.urlsafe_b64encode(secret).rstrip(b'=').decode()}"
    record = TokenRecord(
        token_id=token_id,
        secret_sha256=_hash_secret(secret),
        trust_domain=identity.trust_domain,
        namespace=identity.namespace,
        service_account=identity.service_account,
        created_at=now.timestamp(),
        expires_at=(now + ttl).timestamp(),
        max_uses=max_uses,
    )
    return text, record


def parse_token(token: str) -> tuple[str, bytes]:
    """Split token text into (token_id, secret); ``TokenMalformed`` if it is not one."""
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenMalformed(f"not a join token: expected '{PREFIX}.<id>.<secret>'")
    token_id, secret_b64 = parts[1], parts[2]
    if len(token_id) != 2 * _ID_BYTES or any(c not in "0123456789abcdef" for c in token_id):
        raise TokenMalformed("join token id is not 16 lowercase hex characters")
    try:
        secret = base64.urlsafe_b64decode(secret_b64 + "=" * (-len(secret_b64) % 4))
    except ValueError:
        raise TokenMalformed("join token secret is not base64url") from None
    if len(secret) != _SECRET_BYTES:
        raise TokenMalformed("join token secret has the wrong length (truncated copy?)")
    return token_id, secret


def check_token(
    record: TokenRecord | None,
    token: str,
    identity: SpiffeId,
    *,
    key: str,
    now: datetime | None = None,
) -> TokenRecord:
    """Decide one redemption; pure. Returns the record to write back (or the same record if
    ``key`` -- the CSR key fingerprint -- already redeemed it). Raises a ``TokenRefused``.
    """
    token_id, secret = parse_token(token)
    # Unknown id and wrong secret give the same answer: no oracle for valid ids.
    if record is None or record.token_id != token_id:
        raise TokenUnknown(f"join token {token_id} is unknown or its secret is wrong")
    if not hmac.compare_digest(record.secret_sha256, _hash_secret(secret)):
        raise TokenUnknown(f"join token {token_id} is unknown or its secret is wrong")
    if record.revoked:
        raise TokenRevoked(f"join token {token_id} was revoked")
    ts = (now if now is not None else datetime.now(UTC)).timestamp()
    if ts >= record.expires_at:
        raise TokenExpired(
            f"join token {token_id} expired at {record.expires().isoformat()}; create a new one"
        )
    if record.identity != identity:
        raise TokenWrongIdentity(f"join token {token_id} is for {record.identity}, not {identity}")
    if key in record.bound_keys:
        return record  # a retry of a request already granted: idempotent, uses nothing
    if record.uses >= record.max_uses:
        raise TokenReplayed(
            f"join token {token_id} was already used {record.uses} time(s) (limit "
            f"{record.max_uses})"
        )
    return replace(record, uses=record.uses + 1, bound_keys=(*record.bound_keys, key))


def revoke_token(record: TokenRecord) -> TokenRecord:
    return replace(record, revoked=True)


class TokenStore(Protocol):
    """Where records live (JetStream KV in production). ``revision`` is opaque to callers:
    KV's revision number, or a counter in memory."""

    async def get(self, token_id: str) -> tuple[TokenRecord, int] | None: ...

    async def put(self, record: TokenRecord, *, revision: int | None) -> bool:
        """Write iff the stored revision is still ``revision`` (None: iff absent).
        Returns False on a conflict instead of raising."""
        ...

    async def delete(self, token_id: str) -> None: ...


class MemoryTokenStore:
    """A ``TokenStore`` in a dict, for tests and single-process setups."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[TokenRecord, int]] = {}
        self._rev = 0

    async def get(self, token_id: str) -> tuple[TokenRecord, int] | None:
        return self._data.get(token_id)

    async def put(self, record: TokenRecord, *, revision: int | None) -> bool:
        current = self._data.get(record.token_id)
        if (current[1] if current is not None else None) != revision:
            return False
        self._rev += 1
        self._data[record.token_id] = (record, self._rev)
        return True

    async def delete(self, token_id: str) -> None:
        self._data.pop(token_id, None)

    def __iter__(self) -> Iterator[TokenRecord]:
        return iter([rec for rec, _ in self._data.values()])


async def redeem_token(
    store: TokenStore,
    token: str,
    identity: SpiffeId,
    *,
    key: str,
    now: datetime | None = None,
) -> TokenRecord:
    """Check and count one use of ``token`` for ``identity`` and CSR key fingerprint ``key``.

    Read, decide with ``check_token``, compare-and-set; on a conflict (another CA replica
    redeemed concurrently) read again and re-decide, so the use limit holds across replicas.
    """
    token_id, _ = parse_token(token)
    for _ in range(_MAX_CAS_ATTEMPTS):
        got = await store.get(token_id)
        record, revision = got if got is not None else (None, None)
        updated = check_token(record, token, identity, key=key, now=now)
        if updated is record or await store.put(updated, revision=revision):
            return updated
    raise TokenRefused(f"join token {token_id} is contended; retry the request")
