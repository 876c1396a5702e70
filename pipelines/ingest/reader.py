"""Read an extract file safely: trust checks, file-level checks, then rows in bounded chunks.

File-level problems raise :class:`FileRejected` with a one-line reason; the caller
rolls back everything it stored for the file. Row-level shape problems (a row with
the wrong number of fields) are not file problems: they come back as bad records so
the row can be quarantined (as a bounded, keyed-hash preview).

Every row is read as text. Typing and rule checks happen later (``validate``).

Hostile input (issue 14) is bounded here, while streaming, before anything is held whole:
the file must be a regular file owned by an allowed user, opened without following
symlinks; its decompressed size and compression ratio, line length (and the length of a
record spanning lines), fields per row, records per file and wall time are capped by
:class:`ReadLimits`; chunks are cut by characters as well as rows, so memory depends on
the limits, not on the input.
"""

from __future__ import annotations

import csv
import gc
import gzip
import hashlib
import hmac
import io
import itertools
import logging
import os
import re
import stat
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pipelines.contract import COLUMNS, kind_of
from pipelines.errors import InputRejected

log = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
# Text is read and split into lines in blocks of this many characters.
_BLOCK_CHARS = 1 << 20
# A chunk handed to validation holds at most this many characters of row text (besides at
# most ``chunk_rows`` rows): long rows cannot make a chunk, and its DataFrames, unbounded.
CHUNK_CHARS = 32 << 20
# The compression ratio is judged only past this many decompressed bytes: tiny files
# (a header and a few rows) compress arbitrarily well and are harmless.
_RATIO_FLOOR_BYTES = 4 << 20
# Line separators other than CR/LF that str.splitlines() would also split on; csv must not.
# (Eight substring scans are far faster than one regex character class over a block.)
_OTHER_SEPARATORS = ("\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")
_CSV_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


class FileRejected(InputRejected):
    """The whole file is unusable; ``reason`` is one line naming the problem."""


@dataclass(frozen=True)
class ReadLimits:
    """Hard limits on one extract file (issue 14), taken from :class:`Settings`
    (:meth:`from_settings`; ``ReadLimits.defaults()`` for the configured defaults)."""

    max_file_bytes: int
    max_decompressed_bytes: int
    max_compression_ratio: float
    max_line_chars: int
    max_fields: int
    max_rows: int
    max_seconds: float
    allowed_owner_uids: tuple[int, ...]

    @classmethod
    def defaults(cls) -> ReadLimits:
        """The limits of a default :class:`pipelines.settings.Settings`."""
        from pipelines.settings import Settings

        return cls.from_settings(Settings())

    @classmethod
    def from_settings(cls, settings) -> ReadLimits:
        """Take the limits from a :class:`pipelines.settings.Settings`."""
        return cls(
            max_file_bytes=settings.ingest_max_file_bytes,
            max_decompressed_bytes=settings.ingest_max_decompressed_bytes,
            max_compression_ratio=settings.ingest_max_compression_ratio,
            max_line_chars=settings.ingest_max_line_chars,
            max_fields=settings.ingest_max_fields,
            max_rows=settings.ingest_max_rows,
            max_seconds=settings.ingest_max_seconds,
            allowed_owner_uids=tuple(settings.allowed_owner_uids),
        )


class Chunk:
    """A block of well-shaped records (as text) plus the misshapen ones beside them.

    The records come either as Python rows (``records``) or, when the block's lines were
    split by Arrow (:func:`_split_arrow`), as ``flat``: one Arrow ``large_string`` array of
    every field, row after row, in ``extract.columns`` order (what validation builds from
    rows anyway, so the rows are never made). ``records`` then builds the rows on first use
    (tests, callers that want them); validation takes ``flat`` as it is.
    """

    __slots__ = ("_records", "record_numbers", "bad_shape", "flat")

    def __init__(self, records: list[list[str]] | None, record_numbers: list[int],
                 bad_shape: list[tuple[int, list[str]]] | None = None, *, flat=None):
        self._records = records
        self.record_numbers = record_numbers
        self.bad_shape = [] if bad_shape is None else bad_shape
        self.flat = flat

    @property
    def records(self) -> list[list[str]]:
        """The well-shaped records as lists of text, in ``extract.columns`` order."""
        if self._records is None:
            values = [] if self.flat is None else self.flat.to_pylist()
            count = len(self.record_numbers)
            width = len(values) // count if count else 0
            self._records = [values[start:start + width]
                             for start in range(0, count * width, width)]
        return self._records

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Chunk):
            return NotImplemented
        return ((self.records, self.record_numbers, self.bad_shape)
                == (other.records, other.record_numbers, other.bad_shape))

    def __repr__(self) -> str:
        return (f"Chunk({len(self.record_numbers)} records, {len(self.bad_shape)} misshapen, "
                f"{'flat' if self.flat is not None else 'rows'})")


@dataclass
class ExtractFile:
    """An open extract file with its kind, checksum and header, ready to stream rows.

    ``handle`` is the file opened once by :func:`open_checked`; every later read goes
    through it, so the bytes checked are the bytes loaded even if the name is swapped.
    """

    path: Path
    kind: str
    checksum: str
    header: list[str]
    columns: list[str]  # contract columns present, in file order
    dropped_columns: list[str]  # unknown header cells, as "column N name_hmac <hex>"
    missing_optional: list[str]
    handle: BinaryIO | None = None
    limits: ReadLimits = field(default_factory=ReadLimits.defaults)
    started: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        """Close the file handle (idempotent)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def file_checksum(path: Path) -> str:
    """Return the SHA-256 of the file's bytes (identifies a delivery in the ledger)."""
    with path.open("rb") as handle:
        return _checksum(handle)


def _checksum(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    handle.seek(0)
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def unread_checksum(path: Path) -> str:
    """Ledger key for a file whose bytes could not be read: a digest of its name.

    Deterministic, so a rerun refreshes the same ledger row instead of adding one.
    """
    return hashlib.sha256(b"unreadable\x1f" + path.name.encode("utf-8", "replace")).hexdigest()


_KINDS_OF_NODE = (
    (stat.S_ISLNK, "is a symbolic link; only regular files are read (copy the file in instead)"),
    (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file"),
    (stat.S_ISCHR, "is a character device, not a regular file"),
    (stat.S_ISBLK, "is a block device, not a regular file"),
    (stat.S_ISSOCK, "is a socket, not a regular file"),
    (stat.S_ISDIR, "is a directory, not a file"),
)


def node_problem(info: os.stat_result, limits: ReadLimits) -> str | None:
    """Why a file with this ``lstat`` may not be read, or None when it may."""
    for test, problem in _KINDS_OF_NODE:
        if test(info.st_mode):
            return problem
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_uid not in limits.allowed_owner_uids:
        return (
            f"is owned by uid {info.st_uid}, not an allowed owner "
            "(KYPHOWATCH_ALLOWED_OWNER_UIDS)"
        )
    return None


def open_checked(path: Path, limits: ReadLimits) -> tuple[BinaryIO, str]:
    """Open ``path`` as a trusted extract and return the open handle and its checksum.

    Refuses (``FileRejected``) a vanished or unreadable file, a symlink (``O_NOFOLLOW``), a
    FIFO, device or socket, a file owned by a user outside ``limits.allowed_owner_uids`` and
    a file over ``limits.max_file_bytes``. The node is checked with ``lstat`` before it is
    opened (opening a device or FIFO can block or have side effects) and again with
    ``fstat`` after, so a swap in between is caught.
    """
    name = path.name
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        # A mistyped path on the command line, or a landed file moved away meanwhile.
        raise FileRejected(f"{name}: no such file in {path.parent} (check the path; or it was "
                           "moved away before it could be read)") from None
    except OSError as exc:
        raise FileRejected(f"{name}: cannot be examined ({_os_reason(exc)})") from exc
    problem = node_problem(before, limits)
    if problem:
        raise FileRejected(f"{name}: {problem}")
    if before.st_size > limits.max_file_bytes:
        raise FileRejected(
            f"{name}: {before.st_size} bytes exceeds the {limits.max_file_bytes}-byte file "
            "limit (KYPHOWATCH_INGEST_MAX_FILE_BYTES)"
        )
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise FileRejected(f"{name}: no such file (it vanished before it could be read)") from None
    except OSError as exc:
        raise FileRejected(f"{name}: cannot be opened ({_os_reason(exc)})") from exc
    handle = os.fdopen(descriptor, "rb")
    try:
        after = os.fstat(descriptor)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise FileRejected(f"{name}: replaced while being opened; not read")
        problem = node_problem(after, limits)
        if problem:
            raise FileRejected(f"{name}: {problem}")
        checksum = _checksum(handle)
    except FileRejected:
        handle.close()
        raise
    except OSError as exc:
        handle.close()
        raise FileRejected(f"{name}: unreadable ({_os_reason(exc)})") from exc
    return handle, checksum


def _os_reason(exc: OSError) -> str:
    """An OS error as a short phrase without the path (the caller names the file)."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    if exc.errno is not None and exc.errno == getattr(os, "ELOOP", None):
        return "is a symbolic link; only regular files are read"
    return f"{type(exc).__name__}: {exc.strerror or exc}"


class _Metered(io.RawIOBase):
    """Passes bytes through while enforcing the size, ratio and time budgets of one file."""

    def __init__(self, source: BinaryIO, compressed: BinaryIO | None, name: str,
                 limits: ReadLimits, started: float):
        self._source, self._compressed, self._name = source, compressed, name
        self._limits, self._started = limits, started
        self.bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._source.readinto(buffer)
        self.bytes += count
        limits = self._limits
        if self.bytes > limits.max_decompressed_bytes:
            raise FileRejected(
                f"{self._name}: content exceeds the {limits.max_decompressed_bytes}-byte "
                "decompressed-size limit (KYPHOWATCH_INGEST_MAX_DECOMPRESSED_BYTES)"
            )
        if self._compressed is not None and self.bytes > _RATIO_FLOOR_BYTES:
            consumed = max(self._compressed.tell(), 1)
            if self.bytes > limits.max_compression_ratio * consumed:
                raise FileRejected(
                    f"{self._name}: decompresses more than {limits.max_compression_ratio:g} "
                    "times its compressed size (a decompression bomb?); limit "
                    "KYPHOWATCH_INGEST_MAX_COMPRESSION_RATIO"
                )
        _check_time(self._name, limits, self._started)
        return count


def check_time(extract: ExtractFile) -> None:
    """Reject the file once its wall-time budget is spent (called between chunks)."""
    _check_time(extract.path.name, extract.limits, extract.started)


def _check_time(name: str, limits: ReadLimits, started: float) -> None:
    if time.monotonic() - started > limits.max_seconds:
        raise FileRejected(
            f"{name}: not read within the {limits.max_seconds:g}-second budget per file "
            "(KYPHOWATCH_INGEST_MAX_SECONDS)"
        )


def _open_text(extract: ExtractFile) -> io.TextIOBase:
    """Open the checked handle as UTF-8 text (BOM tolerated), gunzipping ``.gz`` files."""
    handle = extract.handle
    if handle is None:
        raise FileRejected(f"{extract.path.name}: file is not open")
    handle.seek(0)
    magic = handle.read(2)
    handle.seek(0)
    compressed = None
    source: BinaryIO = handle
    if extract.path.name.lower().endswith(".gz") or magic == _GZIP_MAGIC:
        # fileobj given: closing the GzipFile leaves the checked handle open
        source = gzip.GzipFile(fileobj=handle, mode="rb")  # type: ignore[assignment]
        compressed = handle
    metered = _Metered(source, compressed, extract.path.name, extract.limits, extract.started)
    text = io.TextIOWrapper(
        io.BufferedReader(metered, buffer_size=1 << 16),
        encoding="utf-8-sig", errors="strict", newline="",
    )
    text._CHUNK_SIZE = 1 << 16  # fewer, larger reads: the meter runs once per 64 KiB
    return text


def _translate(exc: BaseException, path: Path, limits: ReadLimits) -> FileRejected:
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
            # A field on one line cannot get here (the line limit is checked first), so
            # the field spans lines: a quote opened and not closed, or a huge quoted value.
            return FileRejected(
                f"{name}: a quoted field spanning lines exceeds {limits.max_line_chars} "
                "characters (an unclosed quote?)"
            )
        return FileRejected(f"{name}: malformed CSV ({text})")
    if isinstance(exc, OSError):
        return FileRejected(f"{name}: unreadable ({_os_reason(exc)})")
    return FileRejected(f"{name}: unreadable ({type(exc).__name__}: {exc})")


# A file name is stored and reported as sent only when every part of it (split at ``_``,
# ``-`` and ``.``) is the kind, ``csv``/``gz``, an extract stamp, a site id or a
# lower-case word. Anything else (an identifier typed into a name) is replaced by a hash.
_NAME_PART_STRICT = re.compile(r"^([0-9]{8}(T[0-9]{6})?|[A-Z0-9]{3,8}|[a-z]{1,20})$")
# A name display_name already produced (landing renames such files): shown as it is.
_SHOWN_NAME = re.compile(
    r"^(procedures|complications|file)_[0-9]{8}(T[0-9]{6})?_name_hmac_[0-9a-f]{16}\.csv(\.gz)?$")


def display_name(name: str, key: bytes | None) -> str:
    """The file name as stored in the warehouse and shown in reasons and logs.

    A name made only of expected parts is kept; otherwise it becomes
    ``<kind>_<stamp>_name_hmac_<16 hex>.csv[.gz]`` (the keyed hash lets whoever holds the
    key match it to the sender's file; nobody can read it).
    """
    if _SHOWN_NAME.match(name):
        return name
    parts = [part for part in re.split(r"[_.-]", name) if part]
    kind = kind_of(name)
    if parts and all(_NAME_PART_STRICT.match(part)
                     or part.lower() in ("procedures", "complications", "csv", "gz")
                     for part in parts):
        return name
    from pipelines.contract import extract_stamp

    suffix = ".csv.gz" if name.lower().endswith(".gz") else ".csv"
    return f"{kind or 'file'}_{extract_stamp(name)}_name_hmac_{_hash_text(key, name)[:16]}{suffix}"


def _hash_text(key: bytes | None, text: str) -> str:
    """Keyed HMAC of free text (a header cell) so it can be recognised, never read."""
    return hmac.new(key or b"", text.encode("utf-8", "replace"), hashlib.sha256).hexdigest()


def open_extract(path: Path, limits: ReadLimits | None = None, key: bytes | None = None,
                 *, handle: BinaryIO | None = None, checksum: str | None = None) -> ExtractFile:
    """Check the file as a whole and read its header; the result holds the open file.

    Raises :class:`FileRejected` when the file may not be read (see :func:`open_checked`),
    the name is not an extract name, the file is empty, not UTF-8, not CSV with a comma
    delimiter, or lacks required columns. Unknown header cells are reported by position
    and keyed hash only (a header cell may hold anything, even a patient reference).
    The caller closes the result (:meth:`ExtractFile.close`).
    """
    limits = limits or ReadLimits.defaults()
    kind = kind_of(path.name)
    if handle is None or checksum is None:
        handle, checksum = open_checked(path, limits)
    try:
        return _read_header(path, kind, handle, checksum, limits, key)
    except BaseException:
        handle.close()
        raise


def _read_header(path: Path, kind: str | None, handle: BinaryIO, checksum: str,
                 limits: ReadLimits, key: bytes | None) -> ExtractFile:
    if kind is None:
        raise FileRejected(
            f"{path.name}: not an extract name; expected procedures*.csv[.gz] or "
            "complications*.csv[.gz]"
        )
    if os.fstat(handle.fileno()).st_size == 0:
        raise FileRejected(f"{path.name}: empty file (no header row)")
    extract = ExtractFile(path=path, kind=kind, checksum=checksum, header=[], columns=[],
                          dropped_columns=[], missing_optional=[], handle=handle, limits=limits)
    # The csv module's field limit is process-wide: set for this file, then given back, so
    # that the extract's limit does not become every later reader's (a test's 30 characters
    # once broke the report's CSV checks that ran after it).
    previous_limit = csv.field_size_limit(limits.max_line_chars)
    try:
        with _open_text(extract) as text:
            header_row = next(csv.reader(_bounded_lines(text, extract, [0, 0])), None)
    except FileRejected:
        raise
    except Exception as exc:  # every read error becomes a file rejection
        raise _translate(exc, path, limits) from exc
    finally:
        csv.field_size_limit(previous_limit)
    if not header_row or all(not cell.strip() for cell in header_row):
        raise FileRejected(f"{path.name}: empty file (no header row)")
    if len(header_row) > limits.max_fields:
        raise FileRejected(
            f"{path.name}: the header has {len(header_row)} fields; the limit is "
            f"{limits.max_fields} (KYPHOWATCH_INGEST_MAX_FIELDS)"
        )
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
    # Unknown columns may carry free text, and a header cell itself may hold an
    # identifier: report them by position and keyed hash, never by their text.
    dropped = [
        f"column {position} name_hmac {_hash_text(key, name)}"
        for position, name in enumerate(header, start=1) if name not in known
    ]
    if dropped:
        log.warning("%s: dropping %d unknown column(s) at position(s) %s",
                    display_name(path.name, key),
                    len(dropped), [p for p, n in enumerate(header, start=1) if n not in known])
    extract.header = header
    extract.columns = [name for name in header if name in known]
    extract.dropped_columns = dropped
    extract.missing_optional = [spec.name for spec in specs if spec.name not in header]
    return extract


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


def _split_lines(data: str) -> list[str]:
    """Split text into CSV lines ending in LF, CRLF or CR (as ``newline=""`` reading does).

    The last element is whatever follows the last line end ('' when there is none).
    """
    if not any(separator in data for separator in _OTHER_SEPARATORS):
        lines = data.splitlines(keepends=True)  # C speed; splits on CR/LF/CRLF only here
    else:
        lines = _CSV_LINE.findall(data)
    if lines and lines[-1][-1:] in ("\n", "\r"):
        lines.append("")
    elif not lines:
        lines.append("")
    return lines


def _bounded_lines(text: io.TextIOBase, extract: ExtractFile, span: list[int]) -> Iterator[str]:
    """Return an iterator over the file's lines (see :func:`_line_blocks`)."""
    return itertools.chain.from_iterable(_line_blocks(text, extract, span))


def _line_blocks(text: io.TextIOBase, extract: ExtractFile, span: list[int]
                 ) -> Iterator[list[str]]:  # fmt: skip
    """Yield the file's lines in blocks, rejecting the file at the first over-long line or NUL byte.

    Text is read in blocks, so a line is measured while it is still being read: a line
    longer than ``max_line_chars`` is rejected with at most one block beyond it in memory.
    ``span`` is shared with the consumer, which sets ``span[0]`` to 0 whenever it completes
    a record: a block during which that never happened extended one record (spanning lines
    through quoted line breaks), so such blocks are added up and the file is rejected once
    they exceed the limit (the record is then at most the limit plus two blocks). The
    accounting is per block, not per line, to keep the hot loop in C (``chain``). ``span[1]`` counts
    the characters handed out. A trailing CR is held back until the next block (it may be
    the first half of a CRLF).
    """
    name, limit = extract.path.name, extract.limits.max_line_chars
    tail = ""
    line_number = 0
    open_record = 0  # characters of blocks in which no record was completed
    while True:
        block = text.read(_BLOCK_CHARS)
        nul = block.find("\x00")
        data = tail + (block if nul < 0 else block[:nul])
        lines = _split_lines(data)
        tail = lines.pop()
        if block and nul < 0 and not tail and lines and lines[-1].endswith("\r"):
            tail = lines.pop() + tail
        if lines and max(map(len, lines)) > limit:
            too_long = next(i for i, line in enumerate(lines) if len(line) > limit)
            raise FileRejected(
                f"{name}: line {line_number + too_long + 1} exceeds the {limit}-character "
                "line limit (KYPHOWATCH_INGEST_MAX_LINE_CHARS)"
            )
        if nul >= 0:
            yield lines
            raise csv.Error("line contains NUL")
        if len(tail) > limit:
            raise FileRejected(
                f"{name}: line {line_number + len(lines) + 1} exceeds the {limit}-character "
                "line limit (KYPHOWATCH_INGEST_MAX_LINE_CHARS)"
            )
        span[0] = 1
        yield lines  # the consumer takes every line of a block before asking for more
        line_number += len(lines)
        handed = len(data) - len(tail)
        span[1] += handed
        open_record = open_record + handed if span[0] else 0
        if open_record > limit:
            raise FileRejected(
                f"{name}: a record before line {line_number + 1} spans more than {limit} "
                "characters over several lines (an unclosed quote?)"
            )
        if not block:
            if tail:
                yield [tail]
            return


# Lines without a quote character are split by ``str.split`` instead of the csv module
# (issue 10): such a line is exactly its fields between commas, which is what csv gives it.
# A module switch, so the tests can compare both routes on the same input.
FAST_SPLIT = True


def _split_rows(lines: list[str]) -> list[list[str]]:
    """Lines without quotes as csv would parse them (a blank line gives ``['']``, csv ``[]``)."""
    return [line.rstrip("\r\n").split(",") for line in lines]


def _row_batches(blocks: Iterator[list[str]]
                 ) -> Iterator[tuple[bool, list[str] | list[list[str]]]]:  # fmt: skip
    """Yield the file's records in batches as ``(split, lines or rows)``, parsed as csv would.

    Runs of lines without a quote character (``"``) come as they are, one batch a run
    (``split`` true), for the caller to split at commas (:func:`_split_rows` or
    :func:`_split_arrow`): without quotes every line is one record, its fields the text
    between commas, line end removed; a blank line gives ``['']`` where csv gives ``[]``
    (both are blank to the caller). Other batches are csv's rows. A line with a quote
    starts a csv segment: a fresh reader over the rest of the block and, while a quoted
    record spans lines, the following blocks, one batch per record. The segment ends after
    a record when the reader's next line has no quote (the rest of the block is split
    again) or when it has taken every line handed to it. Between records a reader holds no
    state (the one reader over the whole file stood there too), so each record is parsed
    as before. A block is read only after the caller took every batch of the previous one,
    as before, so the ``span`` accounting of :func:`_line_blocks` sees the same order. With
    ``FAST_SPLIT`` off every block is one csv segment.
    """
    for lines in blocks:
        count = len(lines)
        if not FAST_SPLIT:
            quoted = [0] if count else []
        elif '"' in "".join(lines):
            quoted = [index for index, line in enumerate(lines) if '"' in line]
        else:
            quoted = []
        start = 0
        for first in quoted:
            if first < start:  # a line of a record the reader already took
                continue
            if first > start:
                yield True, lines[start:first]
            handed, spilled = [count - first], [False]

            def spill(handed: list[int] = handed, spilled: list[bool] = spilled
                      ) -> Iterator[list[str]]:  # fmt: skip
                for more in blocks:  # a quoted record goes on: the reader needs the next block
                    spilled[0] = True
                    handed[0] += len(more)
                    yield more

            rest = iter(lines)
            rest.__setstate__(first)  # from line ``first`` without copying the block
            reader = csv.reader(itertools.chain(rest, itertools.chain.from_iterable(spill())),
                                strict=False)
            start = count  # unless a quote-free line follows a record within the block
            for row in reader:
                yield False, [row]
                if reader.line_num == handed[0]:
                    break  # every line handed out is parsed: the next block starts afresh
                if FAST_SPLIT and not spilled[0] and '"' not in lines[first + reader.line_num]:
                    start = first + reader.line_num
                    break
            if start == count:
                break
        if start < count:
            yield True, lines[start:]


# Runs of quote-free lines of the file's width are split by Arrow (issue 10): the fields
# never become Python strings in lists, and validation takes them as the Arrow array it
# would otherwise build from the rows. A module switch, so the tests can compare routes.
ARROW_SPLIT = True


def _split_arrow(lines: list[str], width: int):
    """Quote-free lines split at commas as one flat Arrow ``large_string`` array, or None.

    Row after row, each row's fields in file order: exactly the values of
    :func:`_split_rows` laid end to end (the line end is trimmed as ``rstrip("\\r\\n")``
    does, then split at every comma). None unless every line has ``width`` fields (a blank
    or misshapen line: the caller takes the rows one by one instead).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    fields = pc.split_pattern(
        pc.utf8_rtrim(pa.array(lines, type=pa.large_string()), characters="\r\n"), pattern=",")
    counts = pc.min_max(pc.list_value_length(fields))
    if counts["min"].as_py() != width or counts["max"].as_py() != width:
        return None
    return fields.flatten()


def _reordered(values, width: int, keep: list[int]):
    """A flat array of ``width``-field rows with each row reduced to the fields ``keep``."""
    import numpy as np
    import pyarrow as pa

    rows = len(values) // width
    index = (np.arange(rows, dtype=np.int64)[:, None] * width
             + np.asarray(keep, dtype=np.int64)).ravel()
    return values.take(pa.array(index))


def _make_chunk(pieces: list, numbers: list[int], bad_shape: list) -> Chunk:
    """A chunk of the pieces in order: Python rows (lists) and flat Arrow arrays.

    Only Python rows: a chunk of rows, as before. Any Arrow piece: one flat array, the rows
    converted as validation would convert them (``pa.array`` of the fields end to end).
    """
    if all(isinstance(piece, list) for piece in pieces):
        records = (pieces[0] if len(pieces) == 1
                   else list(itertools.chain.from_iterable(pieces)))  # none: []
        return Chunk(records, numbers, bad_shape)
    import pyarrow as pa

    arrays = [
        pa.array(list(itertools.chain.from_iterable(piece)), type=pa.large_string())
        if isinstance(piece, list) else piece
        for piece in pieces
    ]
    return Chunk(None, numbers, bad_shape, flat=pa.concat_arrays(arrays))


def iter_chunks(extract: ExtractFile, chunk_rows: int) -> Iterator[Chunk]:
    """Yield the data rows in chunks of at most ``chunk_rows`` records.

    Records are re-ordered to ``extract.columns`` (unknown columns removed). Record
    numbers count data records from 1, so a quarantined row can be found in the file.
    Blank lines are skipped (but count towards the record limit). A chunk is also cut at
    :data:`CHUNK_CHARS` characters of text. Read errors and exceeded limits raise
    :class:`FileRejected`. Lines without quotes are split without the csv module
    (:func:`_row_batches`); a run of well-shaped records within the row limit is split by
    Arrow (:func:`_split_arrow`; the chunk then carries ``flat``) and taken in slices
    instead of row by row, with the same chunk cuts.
    """
    limits, name = extract.limits, extract.path.name
    width = len(extract.header)
    keep = [extract.header.index(name) for name in extract.columns]
    reorder = keep != list(range(width))  # most files: every column known, in order
    pieces: list = []  # the chunk so far: lists of rows and flat Arrow arrays, in order
    records: list[list[str]] = []  # the rows after the last Arrow piece
    numbers: list[int] = []
    bad_shape: list[tuple[int, list[str]]] = []
    number = blank = 0
    span = [0, 0]  # see _bounded_lines
    chunk_start = 0
    max_rows, max_fields = limits.max_rows, limits.max_fields
    previous_limit = csv.field_size_limit(limits.max_line_chars)  # given back below
    try:
        with _open_text(extract) as text:
            batches = _row_batches(_line_blocks(text, extract, span))
            header = True  # the first record is the header, already checked
            # The collector is paused while a chunk is built (see paused_gc) and running
            # whenever the caller has the chunk.
            collecting = gc.isenabled()
            gc.disable()
            try:
                for split, rows in batches:
                    if header and rows:
                        header = False
                        span[0] = 0
                        rows = rows[1:]
                    count = len(rows)
                    values = None
                    if (split and count and width > 1
                            and number + blank + count <= max_rows):
                        if ARROW_SPLIT:
                            values = _split_arrow(rows, width)
                        else:
                            rows = _split_rows(rows)
                            if all(len(row) == width for row in rows):
                                values = rows
                        if values is None and ARROW_SPLIT:
                            rows = _split_rows(rows)
                    elif split:
                        rows = _split_rows(rows)
                    if values is not None:
                        # Every line a record of the right width, none blank, no limit
                        # reached: taken in slices, cut where the row-by-row loop would cut.
                        # span[1] only moves between blocks, so the cut by characters holds
                        # for every record until a cut: if it holds now, the loop would cut
                        # after this batch's first record.
                        arrow = not isinstance(values, list)
                        if reorder:
                            values = (_reordered(values, width, keep) if arrow
                                      else [[row[i] for i in keep] for row in values])
                        fields = len(keep) if arrow else 1  # list items per record
                        span[0] = 0
                        start = 0
                        while start < count:
                            room = max(1, chunk_rows - len(numbers) - len(bad_shape))
                            if start == 0 and span[1] - chunk_start >= CHUNK_CHARS:
                                room = 1
                            taken = min(room, count - start)
                            if arrow:
                                if records:
                                    pieces.append(records)
                                    records = []
                                pieces.append(values.slice(start * fields, taken * fields))
                            else:
                                records.extend(values[start:start + taken])
                            numbers.extend(range(number + 1, number + taken + 1))
                            number += taken
                            start += taken
                            if (len(numbers) + len(bad_shape) >= chunk_rows
                                    or span[1] - chunk_start >= CHUNK_CHARS):
                                if collecting:
                                    gc.enable()
                                if records:
                                    pieces.append(records)
                                yield _make_chunk(pieces, numbers, bad_shape)
                                pieces, records, numbers, bad_shape = [], [], [], []
                                chunk_start = span[1]
                                _check_time(name, limits, extract.started)
                                gc.disable()
                        continue
                    for row in rows:
                        span[0] = 0
                        if not row or (len(row) == 1 and not row[0].strip()):
                            blank += 1
                            if number + blank > max_rows:
                                raise _too_many_rows(name, max_rows)
                            continue
                        number += 1
                        if number + blank > max_rows:
                            raise _too_many_rows(name, max_rows)
                        if len(row) != width:
                            if len(row) > max_fields:
                                raise FileRejected(
                                    f"{name}: record {number} has {len(row)} fields; the limit "
                                    f"is {max_fields} (KYPHOWATCH_INGEST_MAX_FIELDS)"
                                )
                            bad_shape.append((number, row))
                        else:
                            records.append([row[i] for i in keep] if reorder else row)
                            numbers.append(number)
                        if (len(numbers) + len(bad_shape) >= chunk_rows
                                or span[1] - chunk_start >= CHUNK_CHARS):
                            if collecting:
                                gc.enable()
                            if records:
                                pieces.append(records)
                            yield _make_chunk(pieces, numbers, bad_shape)
                            pieces, records, numbers, bad_shape = [], [], [], []
                            chunk_start = span[1]
                            _check_time(name, limits, extract.started)
                            gc.disable()
            finally:
                if collecting:
                    gc.enable()
    except FileRejected:
        raise
    except Exception as exc:  # every read error becomes a file rejection
        raise _translate(exc, extract.path, limits) from exc
    finally:
        csv.field_size_limit(previous_limit)
    if records:
        pieces.append(records)
    if pieces or bad_shape:
        yield _make_chunk(pieces, numbers, bad_shape)


def _too_many_rows(name: str, max_rows: int) -> FileRejected:
    return FileRejected(
        f"{name}: more than {max_rows} records (blank lines included); the limit is "
        "KYPHOWATCH_INGEST_MAX_ROWS"
    )
