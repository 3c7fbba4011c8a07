-- 0013: the customer's party joins the invoice comparison (drift class customer_unmatched: a billing customer
-- the ERP has no party for). Stage A's row signatures now include the billing invoice's customer and the ERP
-- posting's party, so an invoice booked to no or another party is a candidate the wide pass looks at. New
-- columns instead of a changed expression: a part written before this migration would keep its stored RowSig
-- until a mutation rewrote it, while a column it lacks is computed from the expression on read.
ALTER TABLE $db.billing_invoices ADD COLUMN IF NOT EXISTS MatchSig UInt64
    MATERIALIZED cityHash64(InvoiceId, TotalMinor, Currency, Region, toDate(IssuedAt), Status, CustomerId);
ALTER TABLE $db.erp_ledger_entries ADD COLUMN IF NOT EXISTS MatchSig UInt64
    MATERIALIZED multiIf(
        EntryType = 'invoice', cityHash64(ExternalRef, AmountMinor, Currency, Region, PeriodDate, Status, PartyRef),
        EntryType = 'payment', cityHash64(AppliedToRef, 'A', ExternalRef, AmountMinor),
        cityHash64(AppliedToRef, 'C', ExternalRef));
ALTER TABLE $db.billing_invoices MATERIALIZE COLUMN MatchSig;
ALTER TABLE $db.erp_ledger_entries MATERIALIZE COLUMN MatchSig;
ALTER TABLE $db.billing_invoices DROP COLUMN IF EXISTS RowSig;
ALTER TABLE $db.erp_ledger_entries DROP COLUMN IF EXISTS RowSig;
