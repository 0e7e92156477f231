"""Join tokens: allow exactly one identity, expire, refuse replays, survive races."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import trio

from mesh import pki, tokens
from mesh.pki_errors import (
    TokenExpired,
    TokenMalformed,
    TokenReplayed,
    TokenRevoked,
    TokenUnknown,
    TokenWrongIdentity,
)
from mesh.spiffe import SpiffeId

KEY_A = "a" * 64
KEY_B = "b" * 64


async def _store_with(identity: SpiffeId, **kw: object) -> tuple[str, tokens.MemoryTokenStore]:
    text, record = tokens.issue_token(identity, **kw)  # type: ignore[arg-type]
    store = tokens.MemoryTokenStore()
    assert await store.put(record, revision=None)
    return text, store


async def test_allow(checkout: SpiffeId) -> None:
    text, store = await _store_with(checkout)
    assert text.startswith("tmj1.")
    rec = await tokens.redeem_token(store, text, checkout, key=KEY_A)
    assert rec.uses == 1 and rec.identity == checkout
    # The stored record holds only a hash of the secret.
    stored = next(iter(store))
    assert text.split(".")[2] not in stored.to_bytes().decode()
    assert tokens.TokenRecord.from_bytes(stored.to_bytes()) == stored


async def test_deny_other_identity(checkout: SpiffeId, inventory: SpiffeId) -> None:
    text, store = await _store_with(checkout)
    with pytest.raises(
        TokenWrongIdentity, match=r"is for spiffe://example\.org/ns/shop/sa/checkout"
    ):
        await tokens.redeem_token(store, text, inventory, key=KEY_A)
    # A refused attempt does not consume the token.
    assert (await tokens.redeem_token(store, text, checkout, key=KEY_A)).uses == 1


async def test_unknown_and_wrong_secret(checkout: SpiffeId) -> None:
    text, store = await _store_with(checkout)
    other_text, _ = tokens.issue_token(checkout)
    with pytest.raises(TokenUnknown):
        await tokens.redeem_token(store, other_text, checkout, key=KEY_A)
    prefix, tid, secret = text.split(".")
    wrong = f"{prefix}.{tid}.{'A' * len(secret)}"
    with pytest.raises(TokenUnknown, match="unknown or its secret is wrong"):
        await tokens.redeem_token(store, wrong, checkout, key=KEY_A)


@pytest.mark.parametrize(
    "text", ["", "hello", "tmj1.zz.abc", "tmj1.0123456789abcdef.!!!", "tmj1.0123456789abcdef.YWJj"]
)
def test_malformed(text: str) -> None:
    with pytest.raises(TokenMalformed):
        tokens.parse_token(text)


async def test_expired(checkout: SpiffeId) -> None:
    past = datetime.now(UTC) - timedelta(hours=2)
    text, store = await _store_with(checkout, ttl=timedelta(hours=1), now=past)
    with pytest.raises(TokenExpired, match="expired at") as info:
        await tokens.redeem_token(store, text, checkout, key=KEY_A)
    assert info.value.reason == "token-expired"


async def test_replay_refused_but_same_request_retry_is_idempotent(checkout: SpiffeId) -> None:
    text, store = await _store_with(checkout)
    first = await tokens.redeem_token(store, text, checkout, key=KEY_A)
    # The CA's reply was lost; the sidecar retries with the same CSR key: granted, no new use.
    again = await tokens.redeem_token(store, text, checkout, key=KEY_A)
    assert again == first and again.uses == 1
    # Anyone replaying the token with another key is refused.
    with pytest.raises(TokenReplayed, match="already used 1 time"):
        await tokens.redeem_token(store, text, checkout, key=KEY_B)


async def test_use_count_limit(checkout: SpiffeId) -> None:
    text, store = await _store_with(checkout, max_uses=2)
    await tokens.redeem_token(store, text, checkout, key=KEY_A)
    await tokens.redeem_token(store, text, checkout, key=KEY_B)
    with pytest.raises(TokenReplayed):
        await tokens.redeem_token(store, text, checkout, key="c" * 64)


async def test_revoked(checkout: SpiffeId) -> None:
    text, store = await _store_with(checkout)
    got = await store.get(tokens.parse_token(text)[0])
    assert got is not None
    assert await store.put(tokens.revoke_token(got[0]), revision=got[1])
    with pytest.raises(TokenRevoked):
        await tokens.redeem_token(store, text, checkout, key=KEY_A)


class _RacingStore(tokens.MemoryTokenStore):
    """Lets a second CA replica redeem between our read and our write, once."""

    def __init__(self, rival_token: str, rival_identity: SpiffeId) -> None:
        super().__init__()
        self._rival = (rival_token, rival_identity)
        self.raced = False

    async def put(self, record: tokens.TokenRecord, *, revision: int | None) -> bool:
        if not self.raced and revision is not None:
            self.raced = True
            await tokens.redeem_token(
                tokens_store_view(self), self._rival[0], self._rival[1], key=KEY_B
            )
        return await super().put(record, revision=revision)


def tokens_store_view(store: tokens.MemoryTokenStore) -> tokens.TokenStore:
    class View:
        async def get(self, token_id: str) -> tuple[tokens.TokenRecord, int] | None:
            return await store.get(token_id)

        async def put(self, record: tokens.TokenRecord, *, revision: int | None) -> bool:
            return await tokens.MemoryTokenStore.put(store, record, revision=revision)

        async def delete(self, token_id: str) -> None:
            await store.delete(token_id)

    return View()


async def test_concurrent_replicas_cannot_both_use_the_last_use(checkout: SpiffeId) -> None:
    text, record = tokens.issue_token(checkout)
    store = _RacingStore(text, checkout)
    assert await tokens.MemoryTokenStore.put(store, record, revision=None)
    # Our write loses the compare-and-set to the rival, we re-read and see the token used up.
    with pytest.raises(TokenReplayed):
        await tokens.redeem_token(store, text, checkout, key=KEY_A)
    assert store.raced


async def test_key_fingerprint_of_csr_key(checkout: SpiffeId) -> None:
    key = pki.generate_key()
    csr = pki.check_csr(pki.build_csr(key, checkout), checkout)
    fp = tokens.key_fingerprint(csr.public_key())
    assert fp == tokens.key_fingerprint(key.public_key()) and len(fp) == 64
    await trio.lowlevel.checkpoint()
