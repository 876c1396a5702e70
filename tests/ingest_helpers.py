"""Helpers for ingest tests: write small extract files and snapshot the warehouse."""

from __future__ import annotations

import gzip
from pathlib import Path

import sqlalchemy as sa

from pipelines import schema
from pipelines.contract import COMPLICATION_COLUMNS, PROCEDURE_COLUMNS

PROC_HEADER = [c.name for c in PROCEDURE_COLUMNS]
COMP_HEADER = [c.name for c in COMPLICATION_COLUMNS]


def proc_row(pid="P1", site="S001", patient="PT-1", date="2024-01-05", **over) -> dict:
    row = {
        "procedure_id": pid, "site_id": site, "patient_ref": patient, "operator_ref": "OP-1",
        "procedure_date": date, "levels_treated": "1", "indication": "osteoporosis",
        "anaesthesia": "local", "balloons": "2", "age_years": "78", "sex": "F",
        "steroid_use": "false", "mdt_discussed": "true",
    }
    row.update(over)
    return row


def comp_row(cid="C1", pid="P1", site="S001", date="2024-01-06", **over) -> dict:
    row = {
        "complication_id": cid, "procedure_id": pid, "site_id": site, "event_date": date,
        "event_type": "cement_leak", "symptomatic": "false", "severity": "minor",
        "vertebral_level": "L1",
    }
    row.update(over)
    return row


def csv_text(header: list[str], rows: list[dict]) -> str:
    def cell(value: str) -> str:
        value = str(value)
        if any(ch in value for ch in ',"\n\r'):
            return '"' + value.replace('"', '""') + '"'
        return value

    lines = [",".join(header)]
    lines += [",".join(cell(row.get(col, "")) for col in header) for row in rows]
    return "\n".join(lines) + "\n"


def write(path: Path, text: str | bytes, *, gz: bool = False) -> Path:
    data = text.encode("utf-8") if isinstance(text, str) else text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


_VOLATILE = {"processed_at", "quarantined_at"}
SNAPSHOT_TABLES = (
    schema.procedure, schema.procedure_version, schema.complication,
    schema.complication_version, schema.pending_complication, schema.quarantine,
    schema.file_ledger,
)


def snapshot(db_url: str) -> dict[str, list[tuple]]:
    """Every row of every data table (minus timestamps), sorted: equal snapshots = equal state."""
    engine = sa.create_engine(db_url)
    out: dict[str, list[tuple]] = {}
    with engine.connect() as conn:
        for table in SNAPSHOT_TABLES:
            cols = [c for c in table.columns if c.name not in _VOLATILE]
            rows = conn.execute(sa.select(*cols)).all()
            out[table.name] = sorted(tuple(str(v) for v in row) for row in rows)
    engine.dispose()
    return out
