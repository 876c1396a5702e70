"""Thresholds and ARL curves computed once and read by every later process (schema version 9).

Why: a CUSUM's threshold depends only on its design (method, odds ratio, the in-control ARL
or false-alarm rate, the reference rate or the binned case mix), not on the data's values,
yet solving for it takes Markov-chain solves or a 4,000-run simulation. An in-process cache
misses in every Airflow task, because each task is a fresh process. So each design's result
is stored in ``threshold_design`` (one row per design and profile version) and a later
monitor reads it instead of computing it again.

How it is used: the engine opens a :class:`ThresholdStore` for the profile, loads its rows
in one query, makes it the active store (:func:`active`) for the computation, and saves the
designs it had to compute. Design code calls :func:`cached` with a kind, the design's
parameters and a function that computes the value; a value comes from the active store,
else from this process's memory, else it is computed (and counted: :func:`computations`).
Without an active store (tests, ``threshold_tables``) only the process memory is used.

The stored value is exactly the computed one (JSON keeps every float's repr, so it reads
back bit for bit), so a run that reads a threshold gives the same signals as the run that
computed it. The key carries the profile name and version: a new profile version designs
afresh. Rows are never updated; a design whose computation changes must change its kind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from pipelines.schema import threshold_design

log = logging.getLogger(__name__)

# Value computed in this process, by (kind, canonical parameters): pure functions of the design.
_memory: dict[tuple[str, str], Any] = {}
_computations = 0
_active: ContextVar[ThresholdStore | None] = ContextVar("threshold_store", default=None)


def computations() -> int:
    """Return how many threshold designs this process has computed (not read)."""
    return _computations


def _canonical(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def _encode(value: Any) -> str:
    """Return the JSON of a float, a tuple of arrays (curves) or a dict (a fit), exactly."""
    if isinstance(value, dict):
        return json.dumps({"object": value}, sort_keys=True)
    if isinstance(value, tuple):
        return json.dumps({"arrays": [np.asarray(a, dtype=np.float64).tolist() for a in value]})
    return json.dumps({"value": float(value)})


def _decode(payload: str) -> Any:
    data = json.loads(payload)
    if "arrays" in data:
        return tuple(np.asarray(a, dtype=np.float64) for a in data["arrays"])
    if "object" in data:
        return data["object"]
    return float(data["value"])


def _fresh(value: Any) -> Any:
    """Return a decoded design as :func:`_decode` would: new arrays and dicts each time.

    A caller may change what it is given; the memoised value must not change with it.
    """
    if isinstance(value, tuple):
        return tuple(a.copy() for a in value)
    if isinstance(value, dict):
        return copy.deepcopy(value)
    return value


class ThresholdStore:
    """The stored designs of one profile version, plus those computed during this run."""

    def __init__(self, profile_name: str, profile_version: str) -> None:
        self.profile_name = profile_name
        self.profile_version = profile_version
        self.stored: dict[str, str] = {}  # design key -> payload
        # design key -> decoded payload: a run reads the same stored design for many sites
        # and charts (1,700 reads of a few hundred designs a night), each a JSON parse.
        self._decoded: dict[str, Any] = {}
        self.new: dict[str, dict[str, Any]] = {}
        self.computed = 0
        self.read = 0

    def key(self, kind: str, canonical: str) -> str:
        """Return the design key: hash of kind, parameters and profile name and version."""
        text = "|".join((kind, canonical, self.profile_name, self.profile_version))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def load(self, conn: sa.Connection) -> None:
        """Read every stored design of this profile version (one query)."""
        rows = conn.execute(
            sa.select(threshold_design.c.design_key, threshold_design.c.payload).where(
                threshold_design.c.profile_name == self.profile_name,
                threshold_design.c.profile_version == self.profile_version,
            )
        ).all()
        self.stored = {key: payload for key, payload in rows}
        self._decoded = {}

    def save(self, conn: sa.Connection) -> int:
        """Insert the designs computed since :meth:`load`; return how many were new.

        Two monitors computing the same design at once store the same value: the second
        insert is skipped (``ON CONFLICT DO NOTHING`` on both databases).
        """
        if not self.new:
            return 0
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        now = datetime.now(UTC)
        rows = [{**row, "computed_at": now} for row in self.new.values()]
        conn.execute(insert(threshold_design).on_conflict_do_nothing(), rows)
        self.stored.update({key: row["payload"] for key, row in self.new.items()})
        saved = len(self.new)
        self.new = {}
        return saved

    def get(self, kind: str, canonical: str, compute: Callable[[], Any]) -> Any:
        """Return the design's value: stored, else from process memory, else computed."""
        key = self.key(kind, canonical)
        if key in self.stored:
            self.read += 1
            if key not in self._decoded:
                self._decoded[key] = _decode(self.stored[key])
            return _fresh(self._decoded[key])
        if key in self.new:
            return _decode(self.new[key]["payload"])
        value, fresh = _from_memory(kind, canonical, compute)
        self.computed += fresh
        self.new[key] = {
            "design_key": key, "kind": kind, "design": canonical,
            "profile_name": self.profile_name, "profile_version": self.profile_version,
            "payload": _encode(value),
        }
        return value

    def counts(self) -> dict[str, int]:
        """Return designs read from the warehouse and computed in this run."""
        return {"read": self.read, "computed": self.computed}


def _from_memory(kind: str, canonical: str, compute: Callable[[], Any]) -> tuple[Any, int]:
    global _computations
    memo = (kind, canonical)
    if memo in _memory:
        return _memory[memo], 0
    value = compute()
    # Round-trip through the stored form, so a computed value and a read one are identical.
    value = _decode(_encode(value))
    _memory[memo] = value
    _computations += 1
    return value, 1


def cached(kind: str, params: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """Return a design's value (float, or tuple of arrays), computing it at most once.

    ``params`` are the design's inputs as JSON scalars or lists; they and ``kind`` name the
    design. The active store is consulted first (see module docstring).
    """
    canonical = _canonical(params)
    store = _active.get()
    if store is not None:
        return store.get(kind, canonical, compute)
    return _from_memory(kind, canonical, compute)[0]


@contextmanager
def active(store: ThresholdStore) -> Iterator[ThresholdStore]:
    """Make ``store`` the one :func:`cached` consults, for the duration of the block."""
    token = _active.set(store)
    try:
        yield store
    finally:
        _active.reset(token)


def open_store(engine: sa.Engine, profile_name: str, profile_version: str) -> ThresholdStore:
    """Return the profile version's store with its stored designs loaded."""
    store = ThresholdStore(profile_name, profile_version)
    with engine.connect() as conn:
        store.load(conn)
    return store


def save_store(engine: sa.Engine, store: ThresholdStore) -> None:
    """Store the designs computed in this run (own transaction: a cache, not a result)."""
    try:
        with engine.begin() as conn:
            saved = store.save(conn)
    except sa.exc.DBAPIError as exc:  # a read-only role: the next run computes them again
        log.warning("monitor: thresholds not stored (%s)", type(exc).__name__)
        return
    if saved:
        log.info("monitor: %d threshold design(s) stored for later runs", saved)
