-- Analyst views over the kyphowatch warehouse.
-- Portable SQL: every statement runs unchanged on SQLite and PostgreSQL.
-- pipelines/schema.py re-creates these on every migration: it drops lines starting with
-- "--" and splits on semicolons, so comments stay on their own lines and no statement
-- contains a semicolon. No view exposes a patient or operator digest or a raw quarantined row.
-- Documented in docs/analyst-guide.md.

-- Retired in schema version 4 (descriptive counts that disagreed with the monitor):
-- replaced by v_site_month_rates. The DROP stays so upgraded databases lose it.
DROP VIEW IF EXISTS v_site_metric_rates;

-- The monitor's figures per site, metric and calendar month of the index date (procedure
-- date, or the patient's first procedure at the site for per-patient metrics). Only mature
-- units are counted (outcome window closed by as_of), exactly as in the charts, so the
-- months of a site add up to the monitor's n and events. expected is the sum of the
-- case-mix expected risks (the baseline when the metric has no risk model). Holds only
-- the newest as_of per profile. months_before_as_of is 0 for the month of as_of, 11 for
-- the oldest month of the last twelve: months of the INDEX date, so new-fracture units
-- (365-day window) of the last twelve months are not mature yet. The report's rolling
-- funnel instead takes units whose outcome window closed in the last 365 days.
DROP VIEW IF EXISTS v_site_month_rates;
CREATE VIEW v_site_month_rates AS
SELECT
    profile_name, site_id, metric, month, denominator, units, events, expected, baseline,
    CASE WHEN units > 0 THEN CAST(events AS DOUBLE PRECISION) / units END AS rate,
    CASE WHEN expected > 0 THEN CAST(events AS DOUBLE PRECISION) / expected END AS o_to_e,
    months_before_as_of,
    run_key, as_of
FROM site_month_metric;

-- Current status per site and metric from the newest monitor run (the report's grid),
-- with the number of open or acknowledged alerts for that site and metric.
DROP VIEW IF EXISTS v_chart_status;
CREATE VIEW v_chart_status AS
SELECT
    s.profile_name, s.site_id, s.metric, s.status, s.reason, s.n, s.events, s.rate,
    s.ci_low, s.ci_high, s.expected, s.baseline, s.cusum_chart, s.cusum_value,
    s.cusum_threshold, s.funnel_position, s.signals_recent, s.signals_total,
    s.level_since,
    COALESCE(a.open_alerts, 0) AS open_alerts,
    s.run_key, s.as_of, s.profile_version
FROM chart_status s
LEFT JOIN (
    SELECT site_id, metric, COUNT(*) AS open_alerts
    FROM alert
    -- Training reviews are confidential to the site lead (docs/report.md), as in
    -- v_open_alerts: counted here they would reveal one.
    WHERE state IN ('open', 'acknowledged') AND kind <> 'training_review'
    GROUP BY site_id, metric
) a ON a.site_id = s.site_id AND a.metric = s.metric;

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
-- rows_quarantined counts bad records: the same raw values with the same reasons count once
-- however many files carried them (an extract re-sent in other bytes, CRLF or gzipped, is a
-- new file in the ledger and quarantines its rows again; user audit, 2026-12-07).
DROP VIEW IF EXISTS v_quarantine_summary;
CREATE VIEW v_quarantine_summary AS
SELECT
    kind,
    reasons,
    COUNT(DISTINCT raw_values) AS rows_quarantined,
    COUNT(DISTINCT source_checksum) AS files,
    COUNT(DISTINCT site_id) AS sites,
    MIN(quarantined_at) AS first_quarantined_at,
    MAX(quarantined_at) AS last_quarantined_at
FROM quarantine
GROUP BY kind, reasons;

-- Quarantined rows per site (as written in the rejected row) and extract kind; bad
-- records counted once, as above.
DROP VIEW IF EXISTS v_quarantine_by_site;
CREATE VIEW v_quarantine_by_site AS
SELECT
    site_id,
    kind,
    COUNT(DISTINCT reasons || raw_values) AS rows_quarantined,
    COUNT(DISTINCT source_checksum) AS files,
    MAX(quarantined_at) AS last_quarantined_at
FROM quarantine
GROUP BY site_id, kind;

-- Alerts not yet resolved, with the delivery status per channel (never the payload).
DROP VIEW IF EXISTS v_open_alerts;
CREATE VIEW v_open_alerts AS
SELECT
    a.alert_id, a.kind, a.site_id, a.metric, a.title, a.state, a.episode, a.created_at,
    a.updated_at,
    o.email_status, o.email_attempts, o.email_sent_at,
    o.webhook_status, o.webhook_attempts, o.webhook_sent_at
FROM alert a
LEFT JOIN (
    SELECT
        alert_id,
        MAX(CASE WHEN channel = 'email' THEN status END) AS email_status,
        MAX(CASE WHEN channel = 'email' THEN attempts END) AS email_attempts,
        MAX(CASE WHEN channel = 'email' THEN sent_at END) AS email_sent_at,
        MAX(CASE WHEN channel = 'webhook' THEN status END) AS webhook_status,
        MAX(CASE WHEN channel = 'webhook' THEN attempts END) AS webhook_attempts,
        MAX(CASE WHEN channel = 'webhook' THEN sent_at END) AS webhook_sent_at
    FROM alert_outbox
    GROUP BY alert_id
) o ON o.alert_id = a.alert_id
-- Training reviews are confidential to the site's clinical lead (HTG108 1.2 training; the
-- operator appears only by pseudonym): they are not on the analysts' open-alert list.
WHERE a.state IN ('open', 'acknowledged') AND a.kind <> 'training_review';

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

-- Every alarm, watch and under-reporting episode of the newest monitor run (one row per
-- episode; end_date is NULL while the episode is current).
DROP VIEW IF EXISTS v_level_episodes;
CREATE VIEW v_level_episodes AS
SELECT
    profile_name, site_id, metric, direction, level, start_date, last_date, end_date,
    CASE WHEN end_date IS NULL THEN 1 ELSE 0 END AS is_current,
    signals, run_key, as_of, profile_version
FROM level_episode;
