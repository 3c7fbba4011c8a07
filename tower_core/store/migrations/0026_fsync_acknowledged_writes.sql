-- 0026: the parts of these tables are fsync'd when an insert writes them, as otel_traces, business_key_links and
-- business_events were from the start. A disk that failed (or a power cut) before the page cache reached it lost:
-- - the trace-id index and trace -> key links of spans whose buffer segment was already removed (the flusher forgets
--   a segment once its insert returns, and these views' targets commit their own parts), so /api/traces answered
--   404 for acknowledged spans;
-- - the queue, the audit log, the actions and what operators did through the API after its 200 (an acknowledgement,
--   an approval, a revoked token), and state rows whose cursor had already moved on, so they were never pulled
--   again.
-- Scratch tables of a run (facts, findings, scope, hashes, ledger rows) are not: a run lost is run again.
ALTER TABLE $db.otel_traces_trace_id_ts MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.trace_key_links MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.step_activity MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.drift_items MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.audit_log MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.actions MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.api_tokens MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.sla_breaches MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.sla_notifications MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.source_skips MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.reconcile_runs MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.reconciliation_statements MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.reconcile_facts MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.connector_cursors MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.billing_invoices MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.billing_payments MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.erp_ledger_entries MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.billing_customers MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.cdp_profiles MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
ALTER TABLE $db.schema_migrations MODIFY SETTING fsync_after_insert = 1, fsync_part_directory = 1;
