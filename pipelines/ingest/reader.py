"""Read an extract file safely: file-level checks, then rows in bounded chunks.

File-level problems raise :class:`FileRejected` with a one-line reason; the caller
rolls back everything it stored for the file. Row-level shape problems (a row with
the wrong number of fields) are not file problems: they come back as bad records so
the row can be quarantined with its raw values.

Every row is read as text. Typing and rule checks happen later (``validate``), so
what reaches quarantine is exactly what the hospital sent.
"""

from __future__ import annotations

import csv
import gc
import gzip
import hashlib
import io
import itertools
import logging
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.contract import COLUMNS, kind_of
from pipelines.errors import InputRejected

log = logging.getLogger(__name__)

# A single field larger than this is a broken file (an unterminated quote swallowing
# the rest of the file, usually), not a long value; long values are row-level rejects.
MAX_FIELD_BYTES = 1_000_000
_GZIP_MAGIC = b"\x1f\x8b"
# Lines are handed to the CSV parser in batches of about this many characters, so the NUL
# check runs once per batch instead of once per line.
_LINE_BATCH_CHARS = 1 << 20


class FileRejected(InputRejected):
    """The whole file is unusable; ``reason`` is one line naming the problem."""


@dataclass
class Chunk:
    """A block of well-shaped records (as text) plus the misshapen ones beside them."""

    records: list[list[str]]
    record_numbers: list[int]
    bad_shape: list[tuple[int, list[str]]] = field(default_factory=list)


@dataclass
class ExtractFile:
    """An extract file with its kind, checksum and header, ready to stream rows."""

    path: Path
    kind: str
    checksum: str
    header: list[str]
    columns: list[str]  # contract columns present, in file order
    dropped_columns: list[str]
    missing_optional: list[str]


def file_checksum(path: Path) -> str:
    """Return the SHA-256 of the file's bytes (identifies a delivery in the ledger)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_text(path: Path) -> io.TextIOBase:
    """Open as UTF-8 text (BOM tolerated), transparently gunzipping ``.gz`` files."""
    with path.open("rb") as probe:
        magic = probe.read(2)
    if path.name.lower().endswith(".gz") or magic == _GZIP_MAGIC:
        raw: io.BufferedIOBase = gzip.open(path, "rb")  # type: ignore[assignment]
    else:
        raw = path.open("rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline="")


def _translate(exc: BaseException, path: Path) -> FileRejected:
    """Turn a low-level read error into a one-line, user-facing rejection."""
    name = path.name
    if isinstance(exc, UnicodeDecodeError):
        return FileRejected(
            f"{name}: not UTF-8 (byte 0x{exc.object[exc.start]:02x} cannot be decoded); "
            "export the file as UTF-8"
        )
    if isinstance(exc, (EOFError, gzip.BadGzipFile, zlib.error)):
        return FileRejected(f"{name}: truncated or corrupt gzip data ({exc})")
    if isinstance(exc, csv.Error):
        text = str(exc)
        if "NUL" in text:
            return FileRejected(f"{name}: contains NUL bytes; this is not a text CSV file")
        if "field larger" in text:
            return FileRejected(
                f"{name}: a field exceeds {MAX_FIELD_BYTES} bytes (unbalanced quote?)"
            )
        return FileRejected(f"{name}: malformed CSV ({text})")
    return FileRejected(f"{name}: unreadable ({type(exc).__name__}: {exc})")


def open_extract(path: Path) -> ExtractFile:
    """Check the file as a whole and read its header.

    Raises :class:`FileRejected` when the name is not an extract name, the file is
    empty, not UTF-8, not CSV with a comma delimiter, or lacks required columns.
    """
    kind = kind_of(path.name)
    if kind is None:
        raise FileRejected(
            f"{path.name}: not an extract name; expected procedures*.csv[.gz] or "
            "complications*.csv[.gz]"
        )
    if not path.is_file():
        raise FileRejected(f"{path.name}: not a file")
    if path.stat().st_size == 0:
        raise FileRejected(f"{path.name}: empty file (no header row)")
    checksum = file_checksum(path)
    csv.field_size_limit(MAX_FIELD_BYTES)
    try:
        with _open_text(path) as text:
            header_row = next(csv.reader(text), None)
    except Exception as exc:  # every read error becomes a file rejection
        raise _translate(exc, path) from exc
    if not header_row or all(not cell.strip() for cell in header_row):
        raise FileRejected(f"{path.name}: empty file (no header row)")
    header = [cell.strip().lower() for cell in header_row]
    specs = COLUMNS[kind]
    required = [spec.name for spec in specs if spec.required]
    missing = [name for name in required if name not in header]
    if missing:
        joined = ",".join(header_row)
        for delimiter, label in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe")):
            if len(header) == 1 and delimiter in joined:
                raise FileRejected(
                    f"{path.name}: wrong delimiter ({label}); extracts must be comma-separated"
                )
        raise FileRejected(f"{path.name}: missing required column(s): {', '.join(missing)}")
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise FileRejected(f"{path.name}: duplicated column(s): {', '.join(duplicated)}")
    known = {spec.name for spec in specs}
    dropped = [name for name in header if name not in known]
    if dropped:
        # Unknown columns may carry free text (and so identifiers): never stored.
        log.warning("%s: dropping %d unknown column(s): %s", path.name, len(dropped), dropped)
    return ExtractFile(
        path=path,
        kind=kind,
        checksum=checksum,
        header=header,
        columns=[name for name in header if name in known],
        dropped_columns=dropped,
        missing_optional=[spec.name for spec in specs if spec.name not in header],
    )


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small acyclic objects.

    A chunk is hundreds of thousands of row lists; each allocation counts towards the
    collector's thresholds, and its full passes re-traverse every row already held, which
    more than doubles the cost of parsing. Rows hold only strings, so they form no cycles
    and nothing is lost by collecting later. The previous state is restored on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _line_batches(text: io.TextIOBase) -> Iterator[list[str]]:
    """Yield the file's lines in batches, failing at the first line holding a NUL byte.

    NUL means binary data (PostgreSQL text cannot hold it). Lines before the offending
    one are still handed over first, so the parser reports any earlier problem first,
    exactly as a line-by-line check would.
    """
    for lines in iter(lambda: text.readlines(_LINE_BATCH_CHARS), []):
        if "\x00" in "".join(lines):
            first_bad = next(i for i, line in enumerate(lines) if "\x00" in line)
            yield lines[:first_bad]
            raise csv.Error("line contains NUL")
        yield lines


def iter_chunks(extract: ExtractFile, chunk_rows: int) -> Iterator[Chunk]:
    """Yield the data rows in chunks of at most ``chunk_rows`` records.

    Records are re-ordered to ``extract.columns`` (unknown columns removed). Record
    numbers count data records from 1, so a quarantined row can be found in the file.
    Blank lines are skipped. Read errors raise :class:`FileRejected`.
    """
    width = len(extract.header)
    keep = [extract.header.index(name) for name in extract.columns]
    reorder = keep != list(range(width))  # most files: every column known, in order
    records: list[list[str]] = []
    numbers: list[int] = []
    bad_shape: list[tuple[int, list[str]]] = []
    number = 0
    try:
        with _open_text(extract.path) as text:
            reader = csv.reader(
                itertools.chain.from_iterable(_line_batches(text)), strict=False
            )
            next(reader, None)  # header, already checked
            # The collector is paused while a chunk is built (see paused_gc) and running
            # whenever the caller has the chunk.
            collecting = gc.isenabled()
            gc.disable()
            try:
                for row in reader:
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue
                    number += 1
                    if len(row) != width:
                        bad_shape.append((number, row))
                    else:
                        records.append([row[i] for i in keep] if reorder else row)
                        numbers.append(number)
                    if len(records) + len(bad_shape) >= chunk_rows:
                        if collecting:
                            gc.enable()
                        yield Chunk(records, numbers, bad_shape)
                        records, numbers, bad_shape = [], [], []
                        gc.disable()
            finally:
                if collecting:
                    gc.enable()
    except FileRejected:
        raise
    except Exception as exc:  # every read error becomes a file rejection
        raise _translate(exc, extract.path) from exc
    if records or bad_shape:
        yield Chunk(records, numbers, bad_shape)
