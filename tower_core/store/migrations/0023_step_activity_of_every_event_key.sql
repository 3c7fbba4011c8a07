-- 0023: a business event naming several keys of its step's type (an ERP batch posting three invoices; CloudEvents'
-- list form of revops.invoice.id) is activity of each of them. 0015's view read the one key column an event row
-- holds (the last value of its type), so the others never ended their items and were reported stuck. The view is
-- replaced under a new name, created before the old one is dropped: events arriving meanwhile reach at least one of
-- them, and a row both wrote collapses (idempotent aggregates). The events stored before that name several keys
-- (migration 0021's KeyRefs) are read again at the end, so running this twice writes nothing twice.
CREATE MATERIALIZED VIEW IF NOT EXISTS $db.step_activity_events_v2_mv TO $db.step_activity
AS WITH
    multiIf(Step = 'cdp_to_billing', 'customer', Step = 'invoice_to_ledger', 'invoice', 'payment') AS kt,
    arrayMap(r -> substring(r, length(kt) + 2), arrayFilter(r -> startsWith(r, concat(kt, ':')), KeyRefs)) AS refs
SELECT
    Step,
    toDate(Time) AS Day,
    kt AS KeyType,
    arrayJoin(arrayFilter(v -> v != '', if(empty(refs),
        [multiIf(Step = 'cdp_to_billing', CustomerId, Step = 'invoice_to_ledger', InvoiceId, PaymentId)], refs)))
        AS KeyValue,
    System,
    Region,
    Time AS FirstSeen,
    Time AS LastSeen
FROM $db.business_events
WHERE Step IN ('cdp_to_billing', 'invoice_to_ledger', 'payment_to_cash', 'refund_to_ledger')
    AND NOT match(Type, '(?i)(fail|reject|error)');

DROP VIEW IF EXISTS $db.step_activity_events_mv;

INSERT INTO $db.step_activity (Step, Day, KeyType, KeyValue, System, Region, FirstSeen, LastSeen)
WITH
    multiIf(Step = 'cdp_to_billing', 'customer', Step = 'invoice_to_ledger', 'invoice', 'payment') AS kt,
    arrayMap(r -> substring(r, length(kt) + 2), arrayFilter(r -> startsWith(r, concat(kt, ':')), KeyRefs)) AS refs
SELECT
    Step,
    toDate(Time) AS Day,
    kt AS KeyType,
    arrayJoin(arrayFilter(v -> v != '', refs)) AS KeyValue,
    System,
    Region,
    Time AS FirstSeen,
    Time AS LastSeen
FROM $db.business_events FINAL
WHERE Step IN ('cdp_to_billing', 'invoice_to_ledger', 'payment_to_cash', 'refund_to_ledger')
    AND NOT match(Type, '(?i)(fail|reject|error)') AND length(refs) > 1;
