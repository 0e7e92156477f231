from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import MeshError
from mesh.pki_errors import SpiffeIdError
from mesh.spiffe import SpiffeId, parse_spiffe_id


def test_round_trip() -> None:
    ident = parse_spiffe_id("spiffe://example.org/ns/shop/sa/checkout")
    assert ident == SpiffeId("example.org", "shop", "checkout")
    assert ident.uri == "spiffe://example.org/ns/shop/sa/checkout"
    assert str(ident) == ident.uri
    assert ident.trust_domain_uri == "spiffe://example.org"
    assert SpiffeId.parse(ident.uri) == ident
    assert {ident: 1}[SpiffeId("example.org", "shop", "checkout")] == 1


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("http://example.org/ns/a/sa/b", "scheme is 'http'"),
        ("SPIFFE://example.org/ns/a/sa/b", "lowercase"),
        ("example.org/ns/a/sa/b", "must start with 'spiffe://'"),
        ("spiffe://Example.org/ns/a/sa/b", "trust domains are lowercase"),
        ("spiffe://example.org:8443/ns/a/sa/b", "port"),
        ("spiffe://user@example.org/ns/a/sa/b", "user info"),
        ("spiffe://example.org/ns/a/sa/b?x=1", "query"),
        ("spiffe://example.org/ns/a/sa/b#frag", "fragment"),
        ("spiffe://example.org", "no workload path"),
        ("spiffe://example.org/", "no workload path"),
        ("spiffe:///ns/a/sa/b", "trust domain is empty"),
        ("spiffe://example.org/ns/a/sa/b/", "/ns/<namespace>/sa/<service-account>"),
        ("spiffe://example.org/ns/a/svc/b", "/ns/<namespace>/sa/<service-account>"),
        ("spiffe://example.org/ns//sa/b", "namespace is empty"),
        ("spiffe://example.org/ns/../sa/b", "relative path segment"),
        ("spiffe://example.org/ns/a/sa/b c", "contains ' '"),
        ("spiffe://exa$mple.org/ns/a/sa/b", "contains '$'"),
    ],
)
def test_invalid_ids_name_the_problem(uri: str, needle: str) -> None:
    with pytest.raises(SpiffeIdError) as info:
        parse_spiffe_id(uri)
    assert needle in str(info.value)
    assert isinstance(info.value, MeshError)
    assert info.value.reason == "bad-spiffe-id"


def test_trust_domain_must_match_when_given() -> None:
    with pytest.raises(SpiffeIdError, match=r"belongs to trust domain 'other\.org'"):
        parse_spiffe_id("spiffe://other.org/ns/a/sa/b", trust_domain="example.org")


def test_constructor_validates() -> None:
    with pytest.raises(SpiffeIdError, match="service account"):
        SpiffeId("example.org", "shop", "bad/name")
    with pytest.raises(SpiffeIdError, match=r"limit is 2048|longer than 2048"):
        parse_spiffe_id("spiffe://example.org/ns/a/sa/" + "b" * 3000)


_td = st.from_regex(r"[a-z0-9._-]{1,40}", fullmatch=True)
_seg = st.from_regex(r"[A-Za-z0-9._-]{1,40}", fullmatch=True).filter(lambda s: s not in (".", ".."))


@given(_td, _seg, _seg)
def test_any_valid_id_round_trips(td: str, ns: str, sa: str) -> None:
    ident = SpiffeId(td, ns, sa)
    assert parse_spiffe_id(ident.uri) == ident
    assert parse_spiffe_id(ident.uri, trust_domain=td).uri == ident.uri


@given(st.text(max_size=80))
def test_parser_never_crashes_with_anything_but_spiffe_id_error(text: str) -> None:
    try:
        parse_spiffe_id(text)
    except SpiffeIdError:
        pass
