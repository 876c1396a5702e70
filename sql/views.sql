-- Analyst views over the kyphowatch warehouse.
-- Portable SQL: every statement runs unchanged on SQLite and PostgreSQL.
-- pipelines/schema.py re-creates these on every migration: it drops lines starting with
-- "--" and splits on semicolons, so comments stay on their own lines and no statement
-- contains a semicolon. No view exposes a patient or operator digest or a raw quarantined row.
-- Documented in docs/analyst-guide.md.

-- Monthly counts per site by procedure month (descriptive: no outcome window or maturity
-- rule is applied here, unlike the monitor -- see docs/analyst-guide.md).
DROP VIEW IF EXISTS v_site_metric_rates;
CREATE VIEW v_site_metric_rates AS
SELECT
    p.site_id AS site_id,
    SUBSTR(CAST(p.procedure_date AS VARCHAR(10)), 1, 7) AS month,
    COUNT(*) AS procedures,
    SUM(CASE WHEN c.leaks > 0 THEN 1 ELSE 0 END) AS leaks,
    SUM(CASE WHEN c.symptomatic_leaks > 0 THEN 1 ELSE 0 END) AS symptomatic_leaks,
    SUM(CASE WHEN c.major_events > 0 THEN 1 ELSE 0 END) AS major_events,
    SUM(CASE WHEN p.mdt_discussed THEN 0 ELSE 1 END) AS mdt_missing,
    ROUND(SUM(CASE WHEN c.leaks > 0 THEN 1 ELSE 0 END) * 1.0 / COUNT(*), 4) AS leak_rate
FROM procedure p
LEFT JOIN (
    SELECT
        procedure_id,
        SUM(CASE WHEN event_type = 'cement_leak' THEN 1 ELSE 0 END) AS leaks,
        SUM(CASE WHEN event_type = 'cement_leak' AND symptomatic THEN 1 ELSE 0 END) AS symptomatic_leaks,
        SUM(CASE WHEN event_type IN ('death', 'paralysis', 'cord_compression', 'canal_intrusion',
                                     'motor_deficit', 'radiculopathy', 'paraesthesia')
                  AND severity IN ('major', 'fatal') THEN 1 ELSE 0 END) AS major_events
    FROM complication
    GROUP BY procedure_id
) c ON c.procedure_id = p.procedure_id
GROUP BY p.site_id, SUBSTR(CAST(p.procedure_date AS VARCHAR(10)), 1, 7);

-- Signals present in the latest monitor run, newest first.
DROP VIEW IF EXISTS v_active_signals;
CREATE VIEW v_active_signals AS
SELECT
    site_id, metric, method, direction, category, episode_start, signal_date,
    observed, expected, n, ci_low, ci_high, statistic, threshold, p_value, baseline,
    citation, profile_name, profile_version, signal_key, first_seen_run, last_seen_run
FROM signal
WHERE active;

-- Quarantined rows by extract kind and reason list (the raw values are not shown).
DROP VIEW IF EXISTS v_quarantine_summary;
CREATE VIEW v_quarantine_summary AS
SELECT
    kind,
    reasons,
    COUNT(*) AS rows_quarantined,
    COUNT(DISTINCT source_checksum) AS files,
    COUNT(DISTINCT site_id) AS sites,
    MIN(quarantined_at) AS first_quarantined_at,
    MAX(quarantined_at) AS last_quarantined_at
FROM quarantine
GROUP BY kind, reasons;

-- The most recent 200 files seen by the loader, with their outcome.
DROP VIEW IF EXISTS v_file_ledger_recent;
CREATE VIEW v_file_ledger_recent AS
SELECT
    processed_at, file_name, kind, extract_ts, status, reason, rows_read, rows_inserted,
    rows_updated, rows_unchanged, rows_quarantined, rows_pending, quarantine_reasons,
    source_checksum
FROM file_ledger
ORDER BY processed_at DESC, file_name
LIMIT 200;

-- Complications waiting for their procedure to arrive.
DROP VIEW IF EXISTS v_pending_complications;
CREATE VIEW v_pending_complications AS
SELECT
    complication_id, procedure_id, site_id, event_date, event_type, symptomatic, severity,
    extract_ts
FROM pending_complication;
