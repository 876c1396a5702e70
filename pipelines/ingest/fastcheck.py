"""A vectorised interpreter of the suite JSON, audited by Great Expectations.

The suites in ``expectations/`` stay the declared rules. This module reads the same JSON
and evaluates each expectation with the pandas operation GX's pandas engine uses for it
(GX 1.24 ``column_map_metrics``), so a row collects exactly the ``meta.reason`` codes GX
would give it, in suite order, without GX's per-run overhead (about 2 s per validation
and a 3-6 s import per process).

Semantics copied from GX, per expectation type:

* ``expect_column_values_to_not_be_null``: a null (None/NaN) fails;
* every other type ignores null values (GX filters them before the condition);
* ``..._to_match_regex`` / ``..._to_not_match_regex``: ``Series.astype(str).str.contains``
  (``re.search``: the suites anchor their patterns with ``^...$``);
* ``..._value_lengths_to_be_between``: ``Series.str.len().between`` (inclusive unless
  ``strict_min``/``strict_max``);
* ``..._to_be_in_set``: ``Series.isin(value_set)``; a ``None`` value set passes every row;
* ``..._to_be_between``: ``>=``/``<=`` (``>``/``<`` when strict).

``{"$PARAMETER": name}`` values are taken from the run's parameters. An expectation type or
keyword the interpreter does not know (``mostly``, ``row_condition``, a new type) makes
:class:`FastSuite` refuse the suite (:class:`UnsupportedSuite`); the caller then validates
with GX alone, so a suite change can never be skipped silently.

Trust, but verify (:class:`Audit`): in every run GX re-checks every row the fast path
flagged plus a deterministic sample of the rows it passed, and any difference in any row's
reasons raises :class:`AuditMismatch`, which fails the file before its transaction
commits. GX is imported only when an audit runs.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# Rows the fast path passed that GX re-checks per file (plus every flagged row). A file of
# at most this many rows is audited in full. Why 2,000: once GX is imported its validation
# costs about the same for 50 or 2,000 rows (measured: see docs/contract.md, "Validation"),
# and a uniform sample of 2,000 finds a fast-path error that passes p = 0.15 % of a file's
# rows with probability 1 - (1 - p)^2000 >= 95 % in that very file; a systematic error
# (a rule interpreted differently) is caught by the equivalence tests before release.
AUDIT_SAMPLE_ROWS = 2_000
# Flagged rows are checked by GX in batches of this many as they accumulate, so a file of
# mostly bad rows is audited in full with bounded memory (a batch costs GX about 1 s).
AUDIT_FLUSH_ROWS = 20_000

_NOT_NULL = "expect_column_values_to_not_be_null"
_MATCH = "expect_column_values_to_match_regex"
_NOT_MATCH = "expect_column_values_to_not_match_regex"
_LENGTHS = "expect_column_value_lengths_to_be_between"
_IN_SET = "expect_column_values_to_be_in_set"
_BETWEEN = "expect_column_values_to_be_between"
_KWARGS = {
    _NOT_NULL: {"column"},
    _MATCH: {"column", "regex"},
    _NOT_MATCH: {"column", "regex"},
    _LENGTHS: {"column", "min_value", "max_value", "strict_min", "strict_max"},
    _IN_SET: {"column", "value_set"},
    _BETWEEN: {"column", "min_value", "max_value", "strict_min", "strict_max"},
}
# A multiplicative hash of the record number orders the rows for the audit sample: the
# same file always gives the same sample, whatever the chunk size, spread over the file.
_SAMPLE_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


class UnsupportedSuite(ValueError):
    """The suite uses an expectation type or keyword the fast path cannot interpret."""


class AuditMismatch(RuntimeError):
    """GX and the fast path gave different reasons for at least one row (a bug: stop)."""


@dataclass(frozen=True)
class _Rule:
    type: str
    column: str
    kwargs: dict
    reason: str


def _resolve(value, parameters: dict):
    """Return ``value`` with a ``{"$PARAMETER": name}`` reference replaced by its value."""
    if isinstance(value, dict) and set(value) == {"$PARAMETER"}:
        name = value["$PARAMETER"]
        if name not in parameters:
            raise KeyError(f"suite parameter {name!r} was not supplied")
        return parameters[name]
    return value


class FastSuite:
    """One suite JSON compiled into vectorised rules."""

    def __init__(self, suite_json: dict):
        self.name = suite_json.get("name", "suite")
        self.rules: list[_Rule] = []
        for exp in suite_json["expectations"]:
            kind, kwargs = exp["type"], dict(exp.get("kwargs") or {})
            allowed = _KWARGS.get(kind)
            if allowed is None:
                raise UnsupportedSuite(f"{self.name}: expectation type {kind} is not interpreted")
            unknown = set(kwargs) - allowed
            if unknown:
                raise UnsupportedSuite(f"{self.name}: {kind} keyword(s) {sorted(unknown)} "
                                       "are not interpreted")
            if "column" not in kwargs:
                raise UnsupportedSuite(f"{self.name}: {kind} without a column")
            reason = (exp.get("meta") or {}).get("reason") or kind
            self.rules.append(_Rule(kind, kwargs.pop("column"), kwargs, reason))
        self.reasons = [rule.reason for rule in self.rules]

    def failing_masks(self, frame: pd.DataFrame, parameters: dict) -> np.ndarray:
        """Return a (rules x rows) boolean array: True where a row fails a rule."""
        out = np.zeros((len(self.rules), len(frame)), dtype=bool)
        for number, rule in enumerate(self.rules):
            out[number] = _failing(rule, frame[rule.column], parameters)
        return out

    def failing_rows(self, frame: pd.DataFrame, parameters: dict) -> dict[int, list[str]]:
        """Return {positional row index: [reason, ...]} like ``SuiteRunner.failing_rows``."""
        masks = self.failing_masks(frame, parameters)
        return reasons_by_row(masks, self.reasons)


def reasons_by_row(masks: np.ndarray, reasons: list[str]) -> dict[int, list[str]]:
    """Turn a (rules x rows) failure array into {row: [reasons in suite order]}."""
    rule_numbers, rows = np.nonzero(masks)  # rule-major: reasons come out in suite order
    failing: dict[int, list[str]] = {}
    for rule_number, row in zip(rule_numbers.tolist(), rows.tolist(), strict=True):
        failing.setdefault(row, []).append(reasons[rule_number])
    return dict(sorted(failing.items()))


def _failing(rule: _Rule, column: pd.Series, parameters: dict) -> np.ndarray:
    """Rows of ``column`` failing ``rule`` (see the module docstring for the semantics)."""
    null = column.isna().to_numpy(dtype=bool)
    if rule.type == _NOT_NULL:
        return null
    present = ~null
    values = column[present]
    kwargs = {name: _resolve(value, parameters) for name, value in rule.kwargs.items()}
    if rule.type in (_MATCH, _NOT_MATCH):
        with warnings.catch_warnings():  # a group in a pattern is only grouping here
            warnings.filterwarnings("ignore", "This pattern is interpreted", UserWarning)
            found = values.astype(str).str.contains(kwargs["regex"]).to_numpy(dtype=bool)
        ok = found if rule.type == _MATCH else ~found
    elif rule.type == _IN_SET:
        if kwargs["value_set"] is None:
            return np.zeros(len(column), dtype=bool)
        ok = values.isin(kwargs["value_set"]).to_numpy(dtype=bool)
    else:  # _LENGTHS, _BETWEEN
        measured = values.str.len() if rule.type == _LENGTHS else values
        ok = _between(measured, kwargs).to_numpy(dtype=bool)
    out = np.zeros(len(column), dtype=bool)
    out[present] = ~ok
    return out


def _between(values: pd.Series, kwargs: dict) -> pd.Series:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if low is None and high is None:
        raise ValueError("min_value and max_value cannot both be None")
    ok = pd.Series(True, index=values.index)
    if low is not None:
        ok &= (values > low) if kwargs.get("strict_min") else (values >= low)
    if high is not None:
        ok &= (values < high) if kwargs.get("strict_max") else (values <= high)
    return ok


@dataclass
class Audit:
    """GX's re-check of one file: every flagged row plus a sample of the passed rows.

    Feed it each chunk's checked frame and fast-path verdicts with :meth:`add`; call
    :meth:`verify` once at the end of the file (before commit). :meth:`start`, once the
    last chunk is added, sends the remaining rows to GX in a background thread, so GX
    checks them while the caller goes on (the merge); :meth:`verify` then waits for that
    answer. ``expectations_dir`` and ``kind`` select the GX suite.
    """

    expectations_dir: str
    kind: str
    sample_rows: int = AUDIT_SAMPLE_ROWS
    flagged: list[pd.DataFrame] = field(default_factory=list)
    flagged_reasons: list[list[str]] = field(default_factory=list)
    sampled: pd.DataFrame | None = None
    sampled_keys: np.ndarray | None = None
    parameters: dict | None = None
    rows_seen: int = 0
    flagged_checked: int = 0
    seconds: float = 0.0
    _running: tuple | None = None  # (thread, frame's record numbers, expected, answer box)

    def add(self, checked: pd.DataFrame, record_numbers: np.ndarray,
            failing: dict[int, list[str]], parameters: dict) -> None:
        """Keep a chunk's flagged rows and its candidates for the passed-row sample."""
        if self.parameters is None:
            self.parameters = parameters
        elif parameters != self.parameters:
            raise ValueError("suite parameters changed within one file")
        self.rows_seen += len(checked)
        numbers = np.asarray(record_numbers, dtype=np.int64)
        flagged = np.fromiter(failing, dtype=np.int64, count=len(failing))
        if len(flagged):
            rows = checked.iloc[flagged].copy()
            rows["__record_number"] = numbers[flagged]
            self.flagged.append(rows)
            self.flagged_reasons.extend(failing[int(position)] for position in flagged)
            if len(self.flagged_reasons) >= AUDIT_FLUSH_ROWS:
                self._check(self.flagged, self.flagged_reasons)
                self.flagged_checked += len(self.flagged_reasons)
                self.flagged, self.flagged_reasons = [], []
        passed = np.ones(len(checked), dtype=bool)
        passed[flagged] = False
        if not passed.any() or self.sample_rows <= 0:
            return
        positions = np.flatnonzero(passed)
        keys = numbers[positions].astype(np.uint64) * _SAMPLE_MULTIPLIER  # wraps mod 2**64
        keep = np.argsort(keys, kind="stable")[: self.sample_rows]
        candidates = checked.iloc[positions[keep]].copy()
        candidates["__record_number"] = numbers[positions[keep]]
        keys = keys[keep]
        if self.sampled is not None:
            candidates = pd.concat([self.sampled, candidates], ignore_index=True)
            keys = np.concatenate([self.sampled_keys, keys])
            keep = np.argsort(keys, kind="stable")[: self.sample_rows]
            candidates, keys = candidates.iloc[keep], keys[keep]
        self.sampled, self.sampled_keys = candidates.reset_index(drop=True), keys

    @property
    def rows_to_check(self) -> int:
        """Rows the GX audit has still to validate (flagged not yet checked, plus sampled)."""
        sampled = 0 if self.sampled is None else len(self.sampled)
        return sum(len(frame) for frame in self.flagged) + sampled

    def start(self) -> None:
        """Send the rows still to check to GX in a background thread (no more :meth:`add`).

        Nothing is decided here: :meth:`verify` waits for GX's answer and compares. Nothing
        starts when there is nothing to check (an empty file).
        """
        import threading

        if self._running is not None:
            return
        frames = list(self.flagged)
        expected = list(self.flagged_reasons)
        if self.sampled is not None:
            frames.append(self.sampled)
            expected.extend([] for _ in range(len(self.sampled)))
        if not frames:
            self._running = (None, None, [], {})
            return
        frame = pd.concat(frames, ignore_index=True)
        numbers = frame.pop("__record_number").to_numpy()
        box: dict = {}

        def ask() -> None:
            try:
                box["answer"] = self._ask(frame)
            except BaseException as exc:  # handed to verify(), which raises it
                box["error"] = exc

        thread = threading.Thread(target=ask, name=f"gx-audit-{self.kind}", daemon=True)
        thread.start()
        self._running = (thread, numbers, expected, box)

    def verify(self) -> dict:
        """Run GX on the kept rows and compare reasons row by row; raise on any difference.

        Returns a summary (rows seen, flagged, sampled, GX seconds) for the log. Nothing is
        imported when there is nothing to check (an empty file).
        """
        self.start()
        thread, numbers, expected, box = self._running
        if thread is not None:
            thread.join()
            if "error" in box:
                raise box["error"]
            self._compare(numbers, expected, box["answer"])
        return {"rows_seen": self.rows_seen,
                "flagged": self.flagged_checked + len(self.flagged_reasons),
                "sampled": 0 if self.sampled is None else len(self.sampled),
                "seconds": self.seconds}

    def _ask(self, frame: pd.DataFrame) -> dict:
        import time

        from pipelines.ingest import gxaudit

        started = time.perf_counter()
        actual = gxaudit.failing_rows(self.expectations_dir, self.kind, frame,
                                      self.parameters or {})
        self.seconds += time.perf_counter() - started
        return actual

    def _check(self, frames: list[pd.DataFrame], expected: list[list[str]]) -> None:
        frame = pd.concat(frames, ignore_index=True)
        numbers = frame.pop("__record_number").to_numpy()
        self._compare(numbers, expected, self._ask(frame))

    def _compare(self, numbers: np.ndarray, expected: list[list[str]], actual: dict) -> None:
        differ = [
            (int(numbers[position]), sorted(want), sorted(actual.get(position, [])))
            for position, want in enumerate(expected)
            if sorted(want) != sorted(actual.get(position, []))
        ]
        if differ:
            # Record numbers and reason codes only: never a value (it may identify a patient).
            shown = "; ".join(f"record {number}: fast {fast} vs GX {gx}"
                              for number, fast, gx in differ[:5])
            raise AuditMismatch(
                f"{self.kind} validation disagrees with the GX suite on {len(differ)} of "
                f"{len(numbers)} audited rows ({shown}); the file is not loaded"
            )
