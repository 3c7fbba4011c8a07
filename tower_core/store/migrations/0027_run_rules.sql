-- 0027: each run records the fingerprint of the rules it compared by (the comparison code and the tolerance, grace
-- and window settings: reconciler/runner.py rules_fingerprint). An incremental run starts from the last run made
-- under the same rules; after an upgrade that changed them, or a change of settings, the first run is a full one,
-- where incremental runs kept the old rules' results for every key that did not change. Runs written before have
-- none, so the first run after this release is a full one.
ALTER TABLE $db.reconcile_runs ADD COLUMN IF NOT EXISTS Rules String DEFAULT '';
