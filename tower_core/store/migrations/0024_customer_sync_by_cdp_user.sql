-- 0024: billing's record of a customer names the CDP user it came from (Stripe's metadata.cdp_user_id, as
-- revops.cdp.user_id). A new customer's CDP profile has no billing id yet, so its cdp_to_billing item is keyed by
-- the CDP user id (connectors/segment/tracking.py), which billing's events never carried as a customer id: the
-- item never ended and paged. A billing event of that step is now activity of the CDP users it names too (an
-- item exists only where the CDP started one, so the extra keys of other customers are inert). 0023's view is
-- replaced as it replaced 0015's, and the billing events stored before are read again (idempotent aggregates).
CREATE MATERIALIZED VIEW IF NOT EXISTS $db.step_activity_events_v3_mv TO $db.step_activity
AS WITH
    multiIf(Step = 'cdp_to_billing', 'customer', Step = 'invoice_to_ledger', 'invoice', 'payment') AS kt,
    arrayMap(r -> substring(r, length(kt) + 2), arrayFilter(r -> startsWith(r, concat(kt, ':')), KeyRefs)) AS refs,
    if(Step = 'cdp_to_billing' AND System != 'cdp',
        arrayMap(r -> substring(r, 10), arrayFilter(r -> startsWith(r, 'cdp_user:'), KeyRefs)), []) AS users
SELECT
    Step,
    toDate(Time) AS Day,
    kt AS KeyType,
    arrayJoin(arrayDistinct(arrayFilter(v -> v != '', arrayConcat(if(empty(refs),
        [multiIf(Step = 'cdp_to_billing', CustomerId, Step = 'invoice_to_ledger', InvoiceId, PaymentId)], refs),
        users)))) AS KeyValue,
    System,
    Region,
    Time AS FirstSeen,
    Time AS LastSeen
FROM $db.business_events
WHERE Step IN ('cdp_to_billing', 'invoice_to_ledger', 'payment_to_cash', 'refund_to_ledger')
    AND NOT match(Type, '(?i)(fail|reject|error)');

DROP VIEW IF EXISTS $db.step_activity_events_v2_mv;

INSERT INTO $db.step_activity (Step, Day, KeyType, KeyValue, System, Region, FirstSeen, LastSeen)
WITH arrayMap(r -> substring(r, 10), arrayFilter(r -> startsWith(r, 'cdp_user:'), KeyRefs)) AS users
SELECT
    Step,
    toDate(Time) AS Day,
    'customer' AS KeyType,
    arrayJoin(arrayFilter(v -> v != '', users)) AS KeyValue,
    System,
    Region,
    Time AS FirstSeen,
    Time AS LastSeen
FROM $db.business_events FINAL
WHERE Step = 'cdp_to_billing' AND System != 'cdp' AND NOT match(Type, '(?i)(fail|reject|error)') AND notEmpty(users);
