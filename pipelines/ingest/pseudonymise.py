"""Keyed pseudonymisation of patient and operator references.

References are pseudonyms local to a site, so the site id is part of the hashed
message: the same reference at two sites is two people. HMAC-SHA256 with a secret
key means the digest cannot be reversed or recomputed by anyone without the key
(a plain hash of a short reference could be brute-forced).
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pandas as pd

_SEPARATOR = "\x1f"  # cannot occur in a site id


def pseudonymise(key: bytes, site_id: str, reference: str) -> str:
    """Return the hex HMAC-SHA256 of ``site_id``/``reference`` under ``key``."""
    message = f"{site_id}{_SEPARATOR}{reference}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def pseudonymise_column(key: bytes, sites: pd.Series, references: pd.Series) -> pd.Series:
    """Pseudonymise a column; empty or missing references stay missing.

    Each distinct (site, reference) pair is hashed once, so a patient with many
    procedures costs one HMAC.
    """
    present = references.notna() & (references.astype("str") != "")
    pairs = pd.Series(
        sites[present].astype("str") + _SEPARATOR + references[present].astype("str")
    )
    codes, uniques = pd.factorize(pairs)
    # One C call per distinct pair (hmac.digest), then a vectorised gather by code.
    digests = np.array(
        [hmac.digest(key, value.encode(), "sha256").hex() for value in uniques], dtype=object
    )
    out = pd.Series(None, index=references.index, dtype=object)
    if len(codes):
        out[present] = digests.take(codes)
    return out
