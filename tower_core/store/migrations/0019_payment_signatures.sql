-- 0019: a payment key's stage-A signature carries the currency, and a refund's or credit note's its amount, so
-- a credit memo booked for another amount or in another currency, or a payment applied in another currency, is
-- a candidate the wide pass classifies (it looked clean before: only the ids were hashed). Applications of a
-- payment are hashed without their amount: a payment split over invoices has one application per invoice,
-- whose amounts the invoice comparison checks. Amounts are hashed unsigned (ERPs book credit memos either way).
-- New columns instead of changed expressions, as in 0013: a part written before would keep its stored values.
ALTER TABLE $db.billing_payments ADD COLUMN IF NOT EXISTS PaySig UInt64
    MATERIALIZED if(Kind = 'payment', cityHash64(PaymentId, 'k', Currency),
        cityHash64(PaymentId, 'k', Currency, abs(AmountMinor)));
ALTER TABLE $db.erp_ledger_entries ADD COLUMN IF NOT EXISTS PaySig UInt64
    MATERIALIZED if(EntryType = 'credit_memo', cityHash64(ExternalRef, 'k', Currency, abs(AmountMinor)),
        cityHash64(ExternalRef, 'k', Currency));
ALTER TABLE $db.billing_payments MATERIALIZE COLUMN PaySig;
ALTER TABLE $db.erp_ledger_entries MATERIALIZE COLUMN PaySig;
ALTER TABLE $db.billing_payments DROP COLUMN IF EXISTS KeySig;
ALTER TABLE $db.erp_ledger_entries DROP COLUMN IF EXISTS RefSig;
-- the wide pass's facts of a payment key: the credit memos' net sum, unsigned, and every currency of its ERP rows
ALTER TABLE $db.reconcile_payment_facts ADD COLUMN IF NOT EXISTS e_memo_sum Int64 DEFAULT 0 AFTER e_sum;
ALTER TABLE $db.reconcile_payment_facts ADD COLUMN IF NOT EXISTS e_currencies String DEFAULT '' AFTER e_currency;
