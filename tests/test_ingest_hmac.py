"""Pseudonymisation with precomputed HMAC states is byte-identical to the standard HMAC."""

from __future__ import annotations

import hashlib
import hmac

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.ingest.keys import _digest
from pipelines.ingest.pseudonymise import KeyedDigest, pseudonymise, pseudonymise_column


def _reference(key: bytes, site: str, reference: str) -> str:
    """Today's digest: the standard library's HMAC of ``site``\\x1f``reference``."""
    return hmac.new(key, f"{site}\x1f{reference}".encode(), hashlib.sha256).hexdigest()


def test_rfc4231_vectors():
    # RFC 4231 test cases 1, 2 and 6 (the last with a 131-byte key, hashed first).
    assert KeyedDigest(b"\x0b" * 20).hexdigest(b"Hi There") == (
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
    assert KeyedDigest(b"Jefe").hexdigest(b"what do ya want for nothing?") == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    assert KeyedDigest(b"\xaa" * 131).hexdigest(
        b"Test Using Larger Than Block-Size Key - Hash Key First") == (
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")


@pytest.mark.parametrize("length", [0, 1, 32, 63, 64, 65, 128, 200])
def test_every_key_length_matches_hmac(length):
    key = bytes((7 * i + 3) % 256 for i in range(length))
    for site, ref in [("S001", "PT-1"), ("", ""), ("S9", "é ü 漢字"), ("S001", "x" * 300)]:
        assert pseudonymise(key, site, ref) == _reference(key, site, ref)
        assert _digest(key, site, ref) == _reference(key, site, ref)


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=0, max_size=150), site=st.text(max_size=10),
       ref=st.text(max_size=200))
def test_random_keys_and_messages_match_hmac(key, site, ref):
    assert pseudonymise(key, site, ref) == _reference(key, site, ref)


def test_column_digests_match_hmac_row_by_row():
    key = b"kyphowatch-test-key-0123456789abcdef"
    site_list = ["S001", "S001", "S002", "S001", "S003", "S003"]
    ref_list = ["PT-1", "PT-1", "PT-1", None, "", "PT-9"]
    out = pseudonymise_column(key, pd.Series(site_list), pd.Series(ref_list, dtype=object))
    expected = [_reference(key, s, r) if r else None
                for s, r in zip(site_list, ref_list, strict=True)]
    assert [None if pd.isna(v) else v for v in out] == expected
    assert out[0] != out[2]  # the same reference at two sites is two people
