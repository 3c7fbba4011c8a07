-- 0021: every business key an event carries, as 'type:value' (an ERP payment applied to two invoices names both).
-- The key columns (InvoiceId, ...) hold one value per type, so a lookup by any other value missed the event when
-- it carried no trace context (events with one are found through business_key_links, written per value).
-- Events stored before keep an empty list and are found by their key columns, as before.
ALTER TABLE $db.business_events ADD COLUMN IF NOT EXISTS KeyRefs Array(String) DEFAULT [] AFTER LedgerEntryId;
ALTER TABLE $db.business_events ADD INDEX IF NOT EXISTS idx_key_refs KeyRefs TYPE bloom_filter(0.01) GRANULARITY 1;
