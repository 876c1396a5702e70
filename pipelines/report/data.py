"""What one report renders, read once from the stored monitor run and the warehouse."""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import sqlalchemy as sa

from pipelines import evidence
from pipelines.settings import Settings

# -- data ------------------------------------------------------------------------------

def data_quality(settings: Settings) -> dict[str, Any]:
    """Return file-ledger counts by kind and status, and quarantined rows by reason."""
    from pipelines.db import reading
    from pipelines.schema import file_ledger, quarantine

    with reading(settings.db_url) as conn:
        files = conn.execute(
            sa.select(file_ledger.c.kind, file_ledger.c.status, sa.func.count(),
                      sa.func.sum(file_ledger.c.rows_read),
                      sa.func.sum(file_ledger.c.rows_quarantined))
            .group_by(file_ledger.c.kind, file_ledger.c.status)
            .order_by(file_ledger.c.kind, file_ledger.c.status)
        ).all()
        reasons_rows = conn.execute(
            sa.select(quarantine.c.kind, quarantine.c.reasons, sa.func.count())
            .group_by(quarantine.c.kind, quarantine.c.reasons)
        ).all()
        rejected = conn.execute(
            sa.select(file_ledger.c.file_name, file_ledger.c.reason,
                      file_ledger.c.processed_at)
            .where(file_ledger.c.status == "rejected")
            .order_by(file_ledger.c.processed_at.desc()).limit(20)
        ).all()
    by_reason: dict[tuple[str, str], int] = {}
    for kind, reasons, count in reasons_rows:
        try:
            codes = json.loads(reasons) if reasons else []
        except ValueError:
            codes = [str(reasons)]
        for code in codes or ["unknown"]:
            by_reason[(kind, str(code))] = by_reason.get((kind, str(code)), 0) + int(count)
    return {
        "files": [{"kind": k or "-", "status": s, "files": int(c), "rows_read": int(r or 0),
                   "rows_quarantined": int(q or 0)} for k, s, c, r, q in files],
        "quarantine": [{"kind": k, "reason": r, "rows": c}
                       for (k, r), c in sorted(by_reason.items())],
        "rejected": [{"file": f, "reason": r, "at": evidence.iso(at)}
                     for f, r, at in rejected],
    }


class ReportData:
    """Everything one report renders, gathered once."""

    def __init__(self, settings: Settings, as_of: date | None) -> None:
        from pipelines.surveillance.profile import load_profile
        from pipelines.surveillance.runs import read_or_compute

        self.profile = load_profile(settings.profile_path)
        self.result = read_or_compute(settings, self.profile, as_of)
        self.as_of = self.result.as_of
        self.facts = evidence.read_site_facts(settings, self.as_of)
        self.quality = data_quality(settings)
        self.evidence = evidence.Evidence(
            self.result, self.profile, self.facts,
            evidence.recent_complications_by_site(settings, self.as_of),
        )
        self.sites = self.evidence.sites
        self.labels = {m.id: m.label for m in self.profile.metrics}
        self.metric_ids = [m.id for m in self.profile.metrics]

    def site(self, site_id: str) -> dict[str, Any]:
        return self.evidence.site_payload(site_id)


