-- 0022: the process running a reconciliation ('host/pid/start ticks'), so a process that starts closes as
-- interrupted only the runs of a process that is gone, not those another tower process (an API beside
-- `tower reconciler` on a ClickHouse server) is running right now. Runs written before have none: closed as before.
ALTER TABLE $db.reconcile_runs ADD COLUMN IF NOT EXISTS Owner String DEFAULT '' AFTER Error;
