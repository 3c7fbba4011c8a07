-- 0014: the ERP side of a key's statement contribution, per posting. A key booked twice on two days (or in two
-- regions or currencies) had its whole ERP sum put in one cell, so the statement showed a residual in both cells
-- although the difference was classified. The invoice facts keep each posting's (region, currency, period day,
-- amount) and the statement facts carry them; a fact written before this migration has none and keeps using its
-- single ERP cell.
ALTER TABLE $db.reconcile_invoice_facts ADD COLUMN IF NOT EXISTS e_cells Array(Tuple(String, String, Date, Int64));
ALTER TABLE $db.reconcile_facts ADD COLUMN IF NOT EXISTS ErpCells Array(Tuple(String, String, Date, Int64));
