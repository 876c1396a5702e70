"""The extract contract as data: file kinds, columns, allowed values.

``docs/contract.md`` is the human-readable version; the Great Expectations suites in
``expectations/`` check the same rules. Keep the three in step (a test does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

PROCEDURES = "procedures"
COMPLICATIONS = "complications"
KINDS = (PROCEDURES, COMPLICATIONS)

INDICATIONS = ("osteoporosis", "malignancy", "haemangioma", "other")
ANAESTHESIA = ("local", "general")
SEXES = ("F", "M", "U")
EVENT_TYPES = (
    "cement_leak",
    "new_fracture",
    "adjacent_fracture",
    "balloon_rupture",
    "radiculopathy",
    "paraesthesia",
    "motor_deficit",
    "paralysis",
    "cord_compression",
    "canal_intrusion",
    "epidural_bleeding",
    "infection",
    "allergy",
    "death",
    "other",
    # contract 1.1, appended so that earlier codes keep their position
    "device_failure",  # a device malfunction other than a balloon rupture (HTG108 2.4.3)
    "cement_embolism",  # cement in the venous system or the lungs (2.5.1)
)
SEVERITIES = ("minor", "major", "fatal")

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
SITE_PATTERN = r"^[A-Z0-9]{3,8}$"
LOT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,31}$"
# GS1 (14 digits), HIBCC (starts with +) and ICCBBA device identifiers, at most 40 characters.
UDI_DI_PATTERN = r"^[A-Za-z0-9+][A-Za-z0-9+./-]{0,39}$"
LEVEL_PATTERN = r"^(C[1-7]|T([1-9]|1[0-2])|L[1-5]|S[1-5])$"
TRUE_WORDS = frozenset({"true", "1", "yes"})
FALSE_WORDS = frozenset({"false", "0", "no"})


@dataclass(frozen=True)
class ColumnSpec:
    """One contract column: name, logical type and whether a value is required."""

    name: str
    dtype: str  # id | site | text | date | int | enum | bool | level
    required: bool = True
    low: int | None = None
    high: int | None = None
    allowed: tuple[str, ...] = ()
    pseudonymised: bool = False


PROCEDURE_COLUMNS = (
    ColumnSpec("procedure_id", "id"),
    ColumnSpec("site_id", "site"),
    ColumnSpec("patient_ref", "text", pseudonymised=True),
    ColumnSpec("operator_ref", "text", required=False, pseudonymised=True),
    ColumnSpec("procedure_date", "date"),
    ColumnSpec("levels_treated", "int", low=1, high=10),
    ColumnSpec("indication", "enum", allowed=INDICATIONS),
    ColumnSpec("anaesthesia", "enum", allowed=ANAESTHESIA),
    ColumnSpec("balloons", "int", low=1, high=2),
    ColumnSpec("age_years", "int", low=18, high=110),
    ColumnSpec("sex", "enum", allowed=SEXES),
    ColumnSpec("steroid_use", "bool"),
    ColumnSpec("mdt_discussed", "bool"),
    # Version 1.1 (issue 12): optional device columns. Product names must be in the device
    # reference list (reference/devices.yaml) or its alias file; docs/contract.md.
    ColumnSpec("balloon_product", "text", required=False),
    ColumnSpec("cement_product", "text", required=False),
    ColumnSpec("cement_lot", "text", required=False),
    ColumnSpec("udi_di", "text", required=False),
)

COMPLICATION_COLUMNS = (
    ColumnSpec("complication_id", "id"),
    ColumnSpec("procedure_id", "id"),
    ColumnSpec("site_id", "site"),
    ColumnSpec("event_date", "date"),
    ColumnSpec("event_type", "enum", allowed=EVENT_TYPES),
    ColumnSpec("symptomatic", "bool"),
    ColumnSpec("severity", "enum", allowed=SEVERITIES),
    ColumnSpec("vertebral_level", "level", required=False),
)

COLUMNS = {PROCEDURES: PROCEDURE_COLUMNS, COMPLICATIONS: COMPLICATION_COLUMNS}
KEY_COLUMN = {PROCEDURES: "procedure_id", COMPLICATIONS: "complication_id"}

_KIND_RE = re.compile(r"^(procedures|complications)[^/]*\.csv(\.gz)?$", re.IGNORECASE)
# Extract timestamp in the file name: _YYYYMMDD or _YYYYMMDDTHHMMSS (orders corrections).
_STAMP_RE = re.compile(r"(?:^|[_.-])(\d{8})(?:T(\d{6}))?(?=[_.-])", re.IGNORECASE)


def kind_of(file_name: str) -> str | None:
    """Return the extract kind named by ``file_name``, or None if it is not an extract."""
    match = _KIND_RE.fullmatch(file_name)
    return match.group(1).lower() if match else None


def extract_stamp(file_name: str) -> str:
    """Return the sortable extract timestamp carried in the file name.

    The stamp is the last ``YYYYMMDD`` or ``YYYYMMDDTHHMMSS`` token of the name (between
    ``_``, ``-`` or ``.``) that is a real date and time:
    ``procedures_S001_20240105.csv`` -> ``20240105T000000``,
    ``procedures_20240105T153000_fixed.csv`` -> ``20240105T153000``. A name without a stamp sorts
    before every stamped delivery (``00000000T000000``). Two deliveries with the same stamp
    are ordered by checksum, which is deterministic but arbitrary: senders who correct a
    file on the same day must give the time (``T153000``); the loader warns on a clash.
    """
    for day, time in reversed(_STAMP_RE.findall(file_name)):
        try:
            datetime.strptime(day + (time or "000000"), "%Y%m%d%H%M%S")
        except ValueError:
            continue  # eight digits that are not a date (a numeric site id, say)
        return f"{day}T{time or '000000'}"
    return "00000000T000000"
