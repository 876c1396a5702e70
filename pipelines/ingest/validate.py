"""Row validation with the Great Expectations suites in ``expectations/``.

A chunk of text records becomes a DataFrame with, for each contract column, the
stripped text (empty -> null) and, for numeric and date columns, two derived
columns: ``<col>__parses`` (the text is a valid value or empty) and ``<col>__value``
(the typed value). The GX suite for the extract kind then runs on that frame with
``result_format=COMPLETE`` so every failing row index comes back; each expectation
carries its quarantine reason code in ``meta.reason``. A row can collect several
reasons; a row with none is valid and is returned typed, ready to load.

The suites are data (versioned JSON); this module only loads and runs them. By default
the suite is evaluated by the vectorised interpreter in :mod:`pipelines.ingest.fastcheck`
and GX audits the flagged rows plus a sample (``checker="fast"``); ``checker="gx"`` runs
GX alone (the reference the equivalence tests compare against). GX is imported only when
it runs; its context is built once per process and reused.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import logging
import os
import sys
import types
import warnings
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.contract import COLUMNS, FALSE_WORDS, TRUE_WORDS, ColumnSpec
from pipelines.ingest.fastcheck import Audit, FastSuite, UnsupportedSuite
from pipelines.ingest.reader import paused_gc
from pipelines.reference import product_parameters

log = logging.getLogger(__name__)

_INT_TEXT = r"^[+]?[0-9]{1,9}$"
# Balloon kyphoplasty entered practice around 1998; earlier dates are typing errors.
EARLIEST_DATE = date(2000, 1, 1)


def _epoch_day(day: date) -> int:
    return (day - date(1970, 1, 1)).days


@dataclass
class ValidatedChunk:
    """Valid rows (typed, contract columns) and the reasons for every invalid row."""

    valid: pd.DataFrame  # typed; index = record number
    invalid: dict[int, list[str]]  # record number -> reason codes
    raw: pd.DataFrame  # text values, index = record number (for quarantine)


def load_suite(expectations_dir: Path, kind: str) -> dict:
    """Read the suite JSON for ``kind`` (``procedures`` or ``complications``)."""
    path = expectations_dir / f"{kind}.json"
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


# Modules GX imports at its own import time only for expectations and renderers the suites
# do not use (SciPy statistics for the distribution tests, Altair for charts): about 40 % of
# GX's import (1.3-1.5 s of 3.5 s CPU measured on this machine, issue 10); jsonschema (the
# JSON-schema expectation) and mistune (markdown renderers) another 0.1 s. They are imported
# on first use instead (see _DeferredModule).
DEFERRED_GX_IMPORTS = ("scipy.stats", "altair", "jsonschema", "mistune")


class _DeferredModule(types.ModuleType):
    """Stands in ``sys.modules`` for a module until one of its attributes is first used.

    ``import altair as alt`` / ``from scipy import stats`` at GX's import then bind this
    object; the first attribute read (``stats.entropy``) imports the real module, replaces
    this one in ``sys.modules`` and delegates to it from then on. So code that uses the
    module gets exactly the real one, only later; code that never uses it never pays for
    it. ``__spec__`` is the real spec, so the import system treats the module as loaded.
    """

    def __init__(self, name: str, spec):
        super().__init__(name)
        self.__spec__ = spec
        self.__dict__["_deferred_real"] = None

    def __getattr__(self, attribute: str):
        real = self.__dict__["_deferred_real"]
        if real is None:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
            self.__dict__["_deferred_real"] = real
        return getattr(real, attribute)


def _defer_unused_gx_imports() -> None:
    """Put a :class:`_DeferredModule` in ``sys.modules`` for each of DEFERRED_GX_IMPORTS.

    Only for a module not imported yet and installed (a missing one stays missing, so GX
    sees what it would see anyway); any problem leaves the normal import in place.
    """
    for name in DEFERRED_GX_IMPORTS:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None:
            sys.modules[name] = _DeferredModule(name, spec)


class SuiteRunner:
    """Runs one GX expectation suite on pandas DataFrames, reusing one ephemeral context."""

    def __init__(self, suite_json: dict):
        # Not configuration: GX reads this switch at import to turn its usage analytics
        # off (extracts are clinical data; nothing about them should leave the machine).
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        if "great_expectations" not in sys.modules:
            _defer_unused_gx_imports()
        # GX's import builds hundreds of thousands of objects (pydantic copies every model
        # field of every base class); the collector's passes over them cost 10-15 % of the
        # import (measured on this machine). They are module state, not garbage, so
        # collecting after the set-up loses nothing.
        with paused_gc():
            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig
            from great_expectations.validator.v1_validator import Validator

            self.suite_json = suite_json
            self.reasons = [exp["meta"]["reason"] for exp in suite_json["expectations"]]
            context = gx.get_context(mode="ephemeral")
            context.variables.progress_bars = ProgressBarsConfig(globally=False)
            name = suite_json["name"]
            suite = context.suites.add(
                gx.ExpectationSuite(name=name, expectations=suite_json["expectations"])
            )
            batch = (
                context.data_sources.add_pandas(f"{name}_source")
                .add_dataframe_asset(f"{name}_frame")
                .add_batch_definition_whole_dataframe(f"{name}_batch")
            )
            self._validation = context.validation_definitions.add(
                gx.ValidationDefinition(name=f"{name}_validation", data=batch, suite=suite)
            )
        self._validator_class = Validator
        self._reason_by_id = {
            exp.id: exp.meta["reason"] for exp in suite.expectations
        }

    def failing_rows(self, frame: pd.DataFrame, parameters: dict) -> dict[int, list[str]]:
        """Return {positional row index: [reason, ...]} for rows failing any expectation.

        An expectation that could not be evaluated at all (a GX error) is a bug in the
        suite, never a row problem, so it raises instead of passing silently.
        """
        # GX's own validator of the validation definition's batch and suite: what
        # ValidationDefinition.run calls (GX 1.24), without the run's freshness checks and
        # without keeping every result in the context's store (0.07-0.12 s of a 0.6 s run,
        # and memory that grew with every audit batch of a long file).
        definition = self._validation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = self._validator_class(
                batch_definition=definition.batch_definition,
                batch_parameters={"dataframe": frame},
                result_format={"result_format": "COMPLETE"},
            ).validate_expectation_suite(definition.suite, parameters)
        failing: dict[int, list[str]] = {}
        for item in result.results:
            error = _raised(item.exception_info)
            if error:
                raise RuntimeError(
                    f"expectation {item.expectation_config.type} on "
                    f"{item.expectation_config.kwargs.get('column')} could not run: {error}"
                )
            if item.success:
                continue
            reason = self._reason_by_id.get(item.expectation_config.id) or (
                item.expectation_config.meta or {}
            ).get("reason", item.expectation_config.type)
            for position in item.result.get("unexpected_index_list") or []:
                failing.setdefault(int(position), []).append(reason)
        return failing


def _raised(info: dict | None) -> str | None:
    """Return the message of an exception GX caught while evaluating, if any."""
    if not info:
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for nested in info.values():  # GX nests errors per metric
        if isinstance(nested, dict) and nested.get("raised_exception"):
            return str(nested.get("exception_message"))
    return None


@lru_cache(maxsize=8)
def gx_runner(expectations_dir: str, kind: str) -> SuiteRunner:
    """Return this process's GX runner for the suite (imports GX on first use)."""
    return SuiteRunner(load_suite(Path(expectations_dir), kind))


@lru_cache(maxsize=8)
def fast_suite(expectations_dir: str, kind: str) -> FastSuite | None:
    """Return the compiled suite, or None when the fast path cannot interpret it.

    None is logged as a warning once: every file of that kind is then validated by GX
    alone (slower, never wrong).
    """
    try:
        return FastSuite(load_suite(Path(expectations_dir), kind))
    except UnsupportedSuite as exc:
        log.warning("validating %s with GX only: %s", kind, exc)
        return None


def _text_frame(records: list[list[str]] | None, columns: list[str], kind: str,
                flat: pa.Array | None = None) -> pd.DataFrame:
    """Return the chunk as stripped text columns (Arrow-backed ``str``), one per contract column.

    The rows are laid end to end in one list and converted to Arrow once; each column is
    then taken from it by stride, in C++. Transposing the rows in Python instead
    (``zip(*records)``, one tuple per column) cost about as much as all the suite's rules
    (1 s per 100,000 rows), and stripping is one call over the whole chunk. The result is
    what pandas' own ``Series.str.strip`` of the ``str`` column gives (the same Arrow
    kernel; tested against it). ``flat``, when given instead of ``records``, is that list
    already in Arrow (the reader's :class:`~pipelines.ingest.reader.Chunk` ``flat``).
    """
    width = len(columns)
    if flat is None:
        rows = len(records)
        if set(map(len, records)) - {width}:  # the reader never yields such a chunk
            raise ValueError(f"records must each have {width} fields")
        with paused_gc():  # one flat list; its strings are not tracked by the collector
            listed = list(itertools.chain.from_iterable(records))
        flat = pa.array(listed, type=pa.large_string())
        del listed
    else:
        rows = len(flat) // width
        if rows * width != len(flat) or flat.type != pa.large_string():
            raise ValueError(f"flat must be large_string values of rows of {width} fields")
    # Arrow-backed strings: vectorised string operations are several times faster.
    text = pc.utf8_trim_whitespace(flat)
    del flat
    position = {name: index for index, name in enumerate(columns)}
    frame = {}
    for spec in COLUMNS[kind]:
        index = position.get(spec.name)
        if index is None:  # an optional column the file lacks: empty text, as in the file
            values = pa.array([""] * rows, type=pa.large_string())
        else:
            values = text.take(pa.array(np.arange(index, rows * width, width, dtype=np.int64)))
        frame[spec.name] = pd.Series(values, dtype="str")
    return pd.DataFrame(frame)


def _int_values(text: pd.Series, well_formed: pd.Series) -> np.ndarray:
    """The numbers of the well-formed integer texts as float64, NaN elsewhere.

    What ``pd.to_numeric(text.where(well_formed), errors="coerce")`` gives (tested against
    it), by Arrow's cast in C++ instead of pandas' parser (2 ms instead of 35 ms per
    100,000 values, measured): a well-formed text is an optional ``+`` and at most nine
    digits, so once the ``+`` is trimmed it always parses, and is exact in float64.
    """
    digits = pc.utf8_ltrim(pa.array(text, type=pa.large_string()), characters="+")
    kept = pc.if_else(pa.array(well_formed.to_numpy(dtype=bool)), digits, None)
    return pc.cast(pc.cast(kept, pa.int64()), pa.float64()).to_numpy(zero_copy_only=False)


def _derive(frame: pd.DataFrame, spec: ColumnSpec, checked: pd.DataFrame) -> None:
    text = frame[spec.name]
    empty = text == ""
    if spec.dtype == "int":
        well_formed = text.str.match(_INT_TEXT)
        checked[f"{spec.name}__parses"] = empty | well_formed
        checked[f"{spec.name}__value"] = _int_values(text, well_formed)
    elif spec.dtype == "date":
        values = pd.to_datetime(text.where(~empty), format="%Y-%m-%d", errors="coerce")
        checked[f"{spec.name}__parses"] = empty | values.notna()
        checked[f"{spec.name}__value"] = values
        # GX compares numbers vectorised (dates element by element), so ranges use day numbers.
        days = values.to_numpy(dtype="datetime64[D]").astype("int64").astype("float64")
        checked[f"{spec.name}__epoch_day"] = np.where(values.isna(), np.nan, days)


def validate_chunk(
    records: list[list[str]],
    record_numbers: list[int],
    columns: list[str],
    kind: str,
    expectations_dir: Path,
    max_date: date,
    *,
    audit: Audit | None = None,
    checker: str = "fast",
    flat: pa.Array | None = None,
) -> ValidatedChunk:
    """Validate one chunk of text records against the suite for ``kind``.

    With ``checker="fast"`` the vectorised interpreter decides and GX audits: the chunk's
    flagged rows and sample candidates go to ``audit`` (the caller verifies it once per
    file), or, without one, to an audit of this chunk alone, verified before returning.
    ``checker="gx"`` validates with GX only. ``flat`` stands for ``records`` when the reader
    split the chunk with Arrow (see :func:`_text_frame`).
    """
    raw = _text_frame(records, columns, kind, flat)
    raw.index = pd.Index(record_numbers, name="record_number")
    checked = raw.where(raw != "", None).reset_index(drop=True)
    for spec in COLUMNS[kind]:
        if spec.dtype == "bool":
            checked[spec.name] = checked[spec.name].str.lower()
        _derive(raw.reset_index(drop=True), spec, checked)
    # Product aliases become reference names here (stored that way); the suite gets the names.
    products = product_parameters(checked, kind, expectations_dir)
    parameters = {"min_epoch_day": _epoch_day(EARLIEST_DATE),
                  "max_epoch_day": _epoch_day(max_date), **products}
    fast = fast_suite(str(expectations_dir), kind) if checker == "fast" else None
    if fast is None:
        if checker not in ("fast", "gx"):
            raise ValueError(f"unknown checker {checker!r}")
        failing = gx_runner(str(expectations_dir), kind).failing_rows(checked, parameters)
    else:
        failing = fast.failing_rows(checked, parameters)
        own_audit = audit is None
        if own_audit:
            audit = Audit(str(expectations_dir), kind)
        audit.add(checked, np.asarray(record_numbers, dtype=np.int64), failing, parameters)
        if own_audit:
            audit.verify()
    bad_positions = np.fromiter(failing.keys(), dtype=np.int64, count=len(failing))
    good_mask = np.ones(len(checked), dtype=bool)
    good_mask[bad_positions] = False
    valid = _typed(checked[good_mask], kind)
    valid.index = raw.index[good_mask]
    invalid = {int(raw.index[pos]): reasons for pos, reasons in failing.items()}
    return ValidatedChunk(valid=valid, invalid=invalid, raw=raw)


def _typed(checked: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Convert validated rows to load-ready Python types (bools, ints, dates)."""
    out = pd.DataFrame(index=checked.index)
    for spec in COLUMNS[kind]:
        if spec.dtype == "int":
            out[spec.name] = checked[f"{spec.name}__value"].astype("int64")
        elif spec.dtype == "date":
            out[spec.name] = checked[f"{spec.name}__value"].dt.date
        elif spec.dtype == "bool":
            lowered = checked[spec.name]
            out[spec.name] = lowered.isin(TRUE_WORDS)
            assert not (~lowered.isin(TRUE_WORDS | FALSE_WORDS)).any()
        else:
            out[spec.name] = checked[spec.name]
    return out
