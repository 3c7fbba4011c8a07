-- 0014: the ERP side of a key's statement contribution, per posting. A key booked twice on two days (or in two
-- regions or currencies) had its whole ERP sum put in one cell, so the statement showed a residual in both cells
-- although the difference was classified. A key with several postings now carries each posting's (region,
-- currency, period day, amount); a key with one posting, and a fact written before this migration, keeps using
-- its single ERP cell.
ALTER TABLE $db.reconcile_facts ADD COLUMN IF NOT EXISTS ErpCells Array(Tuple(String, String, Date, Int64));
