-- 0010: the hashes the reconciler's first pass (stage A) compares, computed once per row at insert instead of
-- on every full run. Stage A of a full run reads these UInt64 columns instead of the id strings and maps it used
-- to hash (the ERP references alone are ~700 MB of strings at 10M invoices). The expressions are the ones stage A
-- used, so a row hashes to the same value whether the column was written at insert or computed for an old part.
-- MATERIALIZE rewrites existing parts in the background (a mutation); until it ends, reads compute the values.

-- Billing invoices: the key, and the invoice's (amount, currency, region, day, status) the ERP posting must match.
ALTER TABLE $db.billing_invoices ADD COLUMN IF NOT EXISTS KeyHash UInt64 MATERIALIZED cityHash64(InvoiceId);
ALTER TABLE $db.billing_invoices ADD COLUMN IF NOT EXISTS RowSig UInt64
    MATERIALIZED cityHash64(InvoiceId, TotalMinor, Currency, Region, toDate(IssuedAt), Status);

-- ERP ledger entries: the invoice an entry belongs to (its own reference for invoice postings, the invoice it
-- applies to for payment applications and credit memos) and the entry's side of the invoice comparison; its
-- own reference (the billing payment id of applications) for the payment comparison.
ALTER TABLE $db.erp_ledger_entries ADD COLUMN IF NOT EXISTS LinkHash UInt64
    MATERIALIZED cityHash64(if(EntryType = 'invoice', ExternalRef, AppliedToRef));
ALTER TABLE $db.erp_ledger_entries ADD COLUMN IF NOT EXISTS RowSig UInt64
    MATERIALIZED multiIf(
        EntryType = 'invoice', cityHash64(ExternalRef, AmountMinor, Currency, Region, PeriodDate, Status),
        EntryType = 'payment', cityHash64(AppliedToRef, 'A', ExternalRef, AmountMinor),
        cityHash64(AppliedToRef, 'C', ExternalRef));
ALTER TABLE $db.erp_ledger_entries ADD COLUMN IF NOT EXISTS RefHash UInt64 MATERIALIZED cityHash64(ExternalRef);
ALTER TABLE $db.erp_ledger_entries ADD COLUMN IF NOT EXISTS RefSig UInt64 MATERIALIZED cityHash64(ExternalRef, 'k');

-- Billing payments: the key, and per allocation the invoice's key hash and the allocation's side of the invoice
-- comparison (what the ERP's application or credit memo must match).
ALTER TABLE $db.billing_payments ADD COLUMN IF NOT EXISTS KeyHash UInt64 MATERIALIZED cityHash64(PaymentId);
ALTER TABLE $db.billing_payments ADD COLUMN IF NOT EXISTS KeySig UInt64 MATERIALIZED cityHash64(PaymentId, 'k');
ALTER TABLE $db.billing_payments ADD COLUMN IF NOT EXISTS AllocHashes Array(UInt64)
    MATERIALIZED arrayMap(i -> cityHash64(i), mapKeys(Allocations));
ALTER TABLE $db.billing_payments ADD COLUMN IF NOT EXISTS AllocSigs Array(UInt64)
    MATERIALIZED arrayMap((i, a) -> if(Kind = 'payment', cityHash64(i, 'A', PaymentId, a), cityHash64(i, 'C', PaymentId)),
        mapKeys(Allocations), mapValues(Allocations));

ALTER TABLE $db.billing_invoices MATERIALIZE COLUMN KeyHash;
ALTER TABLE $db.billing_invoices MATERIALIZE COLUMN RowSig;
ALTER TABLE $db.erp_ledger_entries MATERIALIZE COLUMN LinkHash;
ALTER TABLE $db.erp_ledger_entries MATERIALIZE COLUMN RowSig;
ALTER TABLE $db.erp_ledger_entries MATERIALIZE COLUMN RefHash;
ALTER TABLE $db.erp_ledger_entries MATERIALIZE COLUMN RefSig;
ALTER TABLE $db.billing_payments MATERIALIZE COLUMN KeyHash;
ALTER TABLE $db.billing_payments MATERIALIZE COLUMN KeySig;
ALTER TABLE $db.billing_payments MATERIALIZE COLUMN AllocHashes;
ALTER TABLE $db.billing_payments MATERIALIZE COLUMN AllocSigs;
