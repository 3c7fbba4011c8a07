-- 0025: a run whose statement the retention policy deleted (reconciler/retention.py) says so, so asking for it is
-- a clear 404 rather than an empty statement, which would read as a clean reconciliation. Runs written before
-- keep their statements until a run after this release prunes them.
ALTER TABLE $db.reconcile_runs ADD COLUMN IF NOT EXISTS StatementDropped UInt8 DEFAULT 0;
