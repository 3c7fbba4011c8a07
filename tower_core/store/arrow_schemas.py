"""Arrow schemas of the tables the tower writes in bulk (collector flushes, simulator bulk loads).

Column names and types mirror migrations/*.sql; a contract test inserts through them on both backends.
"""

from __future__ import annotations

import pyarrow as pa

TS_NS = pa.timestamp("ns", tz="UTC")
TS_MS = pa.timestamp("ms", tz="UTC")
ATTRS = pa.map_(pa.string(), pa.string())

OTEL_TRACES = pa.schema(
    [
        ("Timestamp", TS_NS),
        ("TraceId", pa.string()),
        ("SpanId", pa.string()),
        ("ParentSpanId", pa.string()),
        ("TraceState", pa.string()),
        ("SpanName", pa.string()),
        ("SpanKind", pa.string()),
        ("ServiceName", pa.string()),
        ("ResourceAttributes", ATTRS),
        ("ScopeName", pa.string()),
        ("ScopeVersion", pa.string()),
        ("SpanAttributes", ATTRS),
        ("Duration", pa.uint64()),
        ("StatusCode", pa.string()),
        ("StatusMessage", pa.string()),
        ("Events.Timestamp", pa.list_(TS_NS)),
        ("Events.Name", pa.list_(pa.string())),
        ("Events.Attributes", pa.list_(ATTRS)),
        ("Links.TraceId", pa.list_(pa.string())),
        ("Links.SpanId", pa.list_(pa.string())),
        ("Links.TraceState", pa.list_(pa.string())),
        ("Links.Attributes", pa.list_(ATTRS)),
    ]
)

BUSINESS_KEY_LINKS = pa.schema(
    [
        ("KeyType", pa.string()),
        ("KeyValue", pa.string()),
        ("TraceId", pa.string()),
        ("System", pa.string()),
        ("Region", pa.string()),
        ("FirstSeen", TS_NS),
        ("LastSeen", TS_NS),
    ]
)

BUSINESS_EVENTS = pa.schema(
    [
        ("EventId", pa.string()),
        ("Source", pa.string()),
        ("Type", pa.string()),
        ("Subject", pa.string()),
        ("Time", TS_NS),
        ("ReceivedAt", TS_NS),
        ("TraceId", pa.string()),
        ("SpanId", pa.string()),
        ("System", pa.string()),
        ("Region", pa.string()),
        ("Step", pa.string()),
        ("CustomerId", pa.string()),
        ("InvoiceId", pa.string()),
        ("PaymentId", pa.string()),
        ("LedgerEntryId", pa.string()),
        ("KeyRefs", pa.list_(pa.string())),
        ("AmountMinor", pa.int64()),
        ("Currency", pa.string()),
        ("Attributes", ATTRS),
        ("Data", pa.string()),
    ]
)

BILLING_INVOICES = pa.schema(
    [
        ("InvoiceId", pa.string()),
        ("CustomerId", pa.string()),
        ("Region", pa.string()),
        ("Currency", pa.string()),
        ("SubtotalMinor", pa.int64()),
        ("TaxMinor", pa.int64()),
        ("TotalMinor", pa.int64()),
        ("AmountPaidMinor", pa.int64()),
        ("AmountCreditedMinor", pa.int64()),
        ("Status", pa.string()),
        ("IssuedAt", TS_MS),
        ("DueAt", TS_MS),
        ("FinalizedAt", TS_MS),
        ("PaidAt", TS_MS),
        ("UpdatedAt", TS_MS),
        ("SourceSystem", pa.string()),
        ("Attributes", ATTRS),
        ("Version", pa.uint64()),
    ]
)

BILLING_PAYMENTS = pa.schema(
    [
        ("PaymentId", pa.string()),
        ("Kind", pa.string()),
        ("CustomerId", pa.string()),
        ("Region", pa.string()),
        ("Currency", pa.string()),
        ("AmountMinor", pa.int64()),
        ("Method", pa.string()),
        ("Status", pa.string()),
        ("Allocations", pa.map_(pa.string(), pa.int64())),
        ("RelatedPaymentId", pa.string()),
        ("OccurredAt", TS_MS),
        ("UpdatedAt", TS_MS),
        ("SourceSystem", pa.string()),
        ("Attributes", ATTRS),
        ("Version", pa.uint64()),
    ]
)

ERP_LEDGER_ENTRIES = pa.schema(
    [
        ("EntryId", pa.string()),
        ("EntryType", pa.string()),
        ("ExternalRef", pa.string()),
        ("PartyRef", pa.string()),
        ("Region", pa.string()),
        ("Currency", pa.string()),
        ("AmountMinor", pa.int64()),
        ("Status", pa.string()),
        ("AppliedToRef", pa.string()),
        ("PostedAt", TS_MS),
        ("PeriodDate", pa.date32()),
        ("UpdatedAt", TS_MS),
        ("SourceSystem", pa.string()),
        ("Attributes", ATTRS),
        ("Version", pa.uint64()),
    ]
)

# migration 0003
BILLING_CUSTOMERS = pa.schema(
    [
        ("CustomerId", pa.string()),
        ("CdpUserId", pa.string()),
        ("ParentCustomerId", pa.string()),
        ("Name", pa.string()),
        ("Email", pa.string()),
        ("Region", pa.string()),
        ("Currency", pa.string()),
        ("Plan", pa.string()),
        ("TaxRateBp", pa.uint32()),
        ("CreatedAt", TS_MS),
        ("UpdatedAt", TS_MS),
        ("SourceSystem", pa.string()),
        ("Attributes", ATTRS),
        ("Version", pa.uint64()),
    ]
)

CDP_PROFILES = pa.schema(
    [
        ("CdpUserId", pa.string()),
        ("CustomerId", pa.string()),
        ("ParentCustomerId", pa.string()),
        ("Name", pa.string()),
        ("Email", pa.string()),
        ("Region", pa.string()),
        ("UpdatedAt", TS_MS),
        ("SourceSystem", pa.string()),
        ("Traits", ATTRS),
        ("Version", pa.uint64()),
    ]
)
