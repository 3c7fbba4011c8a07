"""Generated arrays -> Arrow tables shaped like the store's state tables (tower_core/store/arrow_schemas.py).

Columnar all the way: ids come from one byte buffer, enumerations from ``take`` on a small dictionary, maps
from offsets + flat key/value arrays. The bulk loader inserts these tables; the in-memory estate turns the
same tables into records, so both modes hold identical data for a seed.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.simulator.config import CURRENCIES, DAY
from connectors.simulator.generate import (
    ADJ,
    METHODS,
    NOUN,
    SUFFIX,
    Chunk,
    Customers,
    cdp_ids,
    customer_ids,
    fixed_ids,
    invoice_ids,
)
from tower_core.models import REGIONS
from tower_core.store.arrow_schemas import (
    BILLING_CUSTOMERS,
    BILLING_INVOICES,
    BILLING_PAYMENTS,
    CDP_PROFILES,
    ERP_LEDGER_ENTRIES,
)

BILLING_SOURCE = "sim-billing"
ERP_SOURCE = "sim-erp"
CDP_SOURCE = "sim-cdp"
_TS = pa.timestamp("ms", tz="UTC")
_REGIONS = pa.array(REGIONS)
_CURRENCIES = pa.array(CURRENCIES)
_NAMES = pa.array([f"{a} {n} {SUFFIX[r][s]}" for r in REGIONS for s in range(3) for a in ADJ for n in NOUN])


def _ts(ms: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(ms, dtype=np.int64), type=pa.int64()).cast(_TS)


def _const(value: str, n: int) -> pa.Array:
    """A constant string column, dictionary-encoded (ClickHouse reads it into String and LowCardinality)."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value]))


def _plain(value: str, n: int) -> pa.StringArray:
    """A constant plain string column (for columns other parts fill with ids, and for map keys)."""
    size = len(value.encode())
    offsets = np.arange(0, (n + 1) * size, size, dtype=np.int32) if size else np.zeros(n + 1, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(value.encode() * n))


def _pick(values: list[str] | pa.Array, idx: np.ndarray) -> pa.Array:
    """values[idx] as a dictionary array: no strings are materialized."""
    arr = values if isinstance(values, pa.Array) else pa.array(values)
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(idx, dtype=np.int32)), arr)


def _table(arrays: list[pa.Array], schema: pa.Schema) -> pa.Table:
    """Like ``from_arrays(schema=...)`` but string columns may be dictionary-encoded."""
    for arr, f in zip(arrays, schema, strict=True):
        t = arr.type.value_type if pa.types.is_dictionary(arr.type) else arr.type
        if t != f.type:
            raise TypeError(f"column {f.name}: {arr.type} does not fit {f.type}")
    return pa.Table.from_arrays(arrays, names=schema.names)


def _version(ms: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(ms, dtype=np.int64).astype(np.uint64) * np.uint64(1_000_000), type=pa.uint64())


def _map(offsets: np.ndarray, keys: pa.Array, values: pa.Array) -> pa.MapArray:
    return pa.MapArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)), keys, values)


def _empty_map(n: int, value_type: pa.DataType = pa.string()) -> pa.MapArray:
    return _map(np.zeros(n + 1, dtype=np.int32), pa.array([], pa.string()), pa.array([], value_type))


def _single_map(n: int, key: str | pa.Array, values: pa.Array) -> pa.MapArray:
    keys = _plain(key, n) if isinstance(key, str) else key
    return _map(np.arange(n + 1, dtype=np.int32), keys, values)


def _date32(ms: np.ndarray) -> pa.Array:
    return pa.array((np.asarray(ms, dtype=np.int64) // DAY).astype(np.int32), type=pa.int32()).cast(pa.date32())


def customer_tables(c: Customers) -> tuple[pa.Table, pa.Table]:
    """(billing_customers, cdp_profiles)."""
    n, nb = c.n, c.n_billing
    idx = np.arange(n, dtype=np.int64)
    cid = customer_ids(idx)
    uid = cdp_ids(idx)
    parent = pc.if_else(pa.array(c.parent >= 0), customer_ids(np.maximum(c.parent, 0)), pa.scalar(""))
    name_idx = ((c.region * 3 + c.suffix) * len(ADJ) + c.adj) * len(NOUN) + c.noun
    names = _pick(_NAMES, name_idx)
    email = pc.binary_join_element_wise(
        "ap", pc.cast(pa.array(c.email_version), pa.string()), "+", cid, "@example.com", ""
    )
    region = _pick(_REGIONS, c.region)
    plan = _pick(["monthly", "annual"], c.annual.astype(np.int64))
    billing = _table(
        [
            cid.slice(0, nb),
            uid.slice(0, nb),
            parent.slice(0, nb),
            names.slice(0, nb),
            email.slice(0, nb),
            region.slice(0, nb),
            _pick(_CURRENCIES, c.currency[:nb]),
            plan.slice(0, nb),
            pa.array(c.tax_bp[:nb].astype(np.uint32)),
            _ts(c.billing_created[:nb]),
            _ts(c.billing_updated[:nb]),
            _const(BILLING_SOURCE, nb),
            _empty_map(nb),
            _version(c.billing_updated[:nb]),
        ],
        BILLING_CUSTOMERS,
    )
    profiles = _table(
        [
            uid,
            cid,
            parent,
            names,
            email,
            region,
            _ts(c.cdp_updated),
            _const(CDP_SOURCE, n),
            _single_map(n, "plan", pa.array(["monthly", "annual"]).take(pa.array(c.annual.astype(np.int64)))),
            _version(c.cdp_updated),
        ],
        CDP_PROFILES,
    )
    return billing, profiles


def invoice_table(ch: Chunk) -> pa.Table:
    """billing_invoices rows; an invoice hit by duplicate_webhook is written twice (same version)."""
    n = ch.n
    # the usage line, where there is one (subtotal = the customer's plan price + usage)
    has_usage = ch.usage > 0
    usage = pc.cast(pa.array(ch.usage[has_usage]), pa.string())
    offsets = np.concatenate([[0], np.cumsum(has_usage)])
    table = _table(
        [
            invoice_ids(ch.j),
            customer_ids(ch.cust),
            _pick(_REGIONS, ch.region),
            _pick(_CURRENCIES, ch.currency),
            pa.array(ch.subtotal),
            pa.array(ch.tax),
            pa.array(ch.total),
            pa.array(ch.amount_paid),
            pa.array(ch.amount_credited),
            _pick(["open", "paid"], ch.paid.astype(np.int64)),
            _ts(ch.issued),
            _ts(ch.due),
            _ts(ch.finalized),
            _ts(ch.paid_at),
            _ts(ch.updated),
            _const(BILLING_SOURCE, n),
            _map(offsets, _plain("usage_minor", len(usage)), usage),
            _version(ch.updated),
        ],
        BILLING_INVOICES,
    )
    dups = np.flatnonzero(ch.dup_webhook)
    if len(dups):
        table = pa.concat_tables([table, table.take(pa.array(dups))])
    return table


def _payment_rows(
    ch: Chunk,
    rows: np.ndarray,
    ids: pa.Array,
    kind: str | pa.Array,
    amount: np.ndarray,
    method: pa.Array,
    status: str,
    allocations: pa.MapArray,
    related: pa.Array,
    occurred: np.ndarray,
    cust: np.ndarray | None = None,
    region: np.ndarray | None = None,
    currency: np.ndarray | None = None,
    attributes: pa.MapArray | None = None,
) -> pa.Table:
    m = len(rows)
    cust = ch.cust[rows] if cust is None else cust
    region = ch.region[rows] if region is None else region
    currency = ch.currency[rows] if currency is None else currency
    return _table(
        [
            ids,
            _const(kind, m) if isinstance(kind, str) else kind,
            customer_ids(cust),
            _pick(_REGIONS, region),
            _pick(_CURRENCIES, currency),
            pa.array(amount, pa.int64()),
            method,
            _const(status, m),
            allocations,
            related,
            _ts(occurred),
            _ts(occurred),
            _const(BILLING_SOURCE, m),
            attributes if attributes is not None else _empty_map(m),
            _version(occurred),
        ],
        BILLING_PAYMENTS,
    )


def payment_table(ch: Chunk) -> pa.Table:
    """billing_payments rows: failed attempts, payments, second payments, refunds/credit notes, orphans."""
    parts = []
    j = ch.j
    empty = pa.array([], pa.string())
    # failed attempts
    r0 = np.flatnonzero(ch.p_exists[0])
    parts.append(
        _payment_rows(
            ch,
            r0,
            fixed_ids("py_", j[r0] * 4, 11),
            "payment",
            ch.p_amount[0][r0],
            _const("card", len(r0)),
            "failed",
            _empty_map(len(r0), pa.int64()),
            _plain("", len(r0)),
            ch.p_time[0][r0],
            attributes=_single_map(len(r0), "failure_code", _plain("card_declined", len(r0))),
        )
    )
    # first payments, with the allocations of multi-invoice groups
    r1 = np.flatnonzero(ch.p_exists[1])
    members = np.flatnonzero(ch.payer >= 0)
    order = np.lexsort((members, ch.payer[members]))
    members = members[order]
    counts = np.bincount(ch.payer[members], minlength=ch.n)[r1]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    alloc = _map(offsets, invoice_ids(j[members]), pa.array(ch.alloc1[members], pa.int64()))
    parts.append(
        _payment_rows(
            ch,
            r1,
            fixed_ids("py_", j[r1] * 4 + 1, 11),
            "payment",
            ch.p_amount[1][r1],
            _pick(list(METHODS), ch.p_method[1][r1]),
            "succeeded",
            alloc,
            _plain("", len(r1)),
            ch.p_time[1][r1],
        )
    )
    # second payments
    r2 = np.flatnonzero(ch.p_exists[2])
    parts.append(
        _payment_rows(
            ch,
            r2,
            fixed_ids("py_", j[r2] * 4 + 2, 11),
            "payment",
            ch.p_amount[2][r2],
            _pick(list(METHODS), ch.p_method[2][r2]),
            "succeeded",
            _single_map(len(r2), invoice_ids(j[r2]), pa.array(ch.p_amount[2][r2], pa.int64())),
            _plain("", len(r2)),
            ch.p_time[2][r2],
        )
    )
    # refunds and credit notes
    for is_credit, prefix, kind in ((False, "re_", "refund"), (True, "cn_", "credit_note")):
        r3 = np.flatnonzero(ch.p_exists[3] & (ch.s3_is_credit == is_credit))
        related = _plain("", len(r3)) if is_credit else fixed_ids("py_", j[r3] * 4 + 1, 11)
        method = _const("", len(r3)) if is_credit else _pick(list(METHODS), ch.p_method[3][r3])
        parts.append(
            _payment_rows(
                ch,
                r3,
                fixed_ids(prefix, j[r3] * 4 + 3, 11),
                kind,
                ch.p_amount[3][r3],
                method,
                "succeeded",
                _single_map(len(r3), invoice_ids(j[r3]), pa.array(ch.p_amount[3][r3], pa.int64())),
                related,
                ch.p_time[3][r3],
            )
        )
    # orphan payments: no invoice at all
    ro = ch.o_slot
    parts.append(
        _payment_rows(
            ch,
            ro,
            fixed_ids("py_", j[ro] * 4 + 3, 11),
            "payment",
            ch.o_amount,
            _const("bank_transfer", len(ro)),
            "succeeded",
            _empty_map(len(ro), pa.int64()),
            _plain("", len(ro)),
            ch.o_time,
            cust=ch.o_cust,
            region=ch.o_region,
            currency=ch.o_currency,
        )
    )
    del empty
    return pa.concat_tables(parts)


def ledger_table(ch: Chunk) -> pa.Table:
    """erp_ledger_entries rows: invoice postings (and drafts, duplicates), payment applications, credit memos."""
    j = ch.j
    parts = []
    inv_ids = invoice_ids(j)
    # the ERP's party of each entry: the billing customer, or none where the ERP has no party for it
    cus_ids = (
        pc.if_else(pa.array(ch.unmapped), pa.scalar(""), customer_ids(ch.cust))
        if ch.unmapped.any()
        else customer_ids(ch.cust)
    )
    for slot in (0, 1):
        r = np.flatnonzero(ch.e_exists[slot])
        m = len(r)
        status = _pick(["open", "paid", "draft"], ch.e_status[r]) if slot == 0 else _const("open", m)
        drafts = ch.e_status[r] == 2 if slot == 0 else np.zeros(m, dtype=bool)
        offsets = np.concatenate([[0], np.cumsum(drafts)])
        msgs = pa.array(ch.period_closed_msg if slot == 0 else [], pa.string())
        attrs = _map(offsets, _plain("rejection", int(drafts.sum())), msgs)
        updated = ch.e_updated[r] if slot == 0 else ch.e_posted[slot][r]
        parts.append(
            _table(
                [
                    fixed_ids("le_", j[r] * 10 + slot, 11),
                    _const("invoice", m),
                    inv_ids.take(pa.array(r)),
                    cus_ids.take(pa.array(r)),
                    _pick(_REGIONS, ch.region[r]),
                    _pick(_CURRENCIES, ch.e_currency[r]),
                    pa.array(ch.e_amount[slot][r], pa.int64()),
                    status,
                    _plain("", m),
                    _ts(ch.e_posted[slot][r]),
                    _date32(ch.issued[r]),
                    _ts(updated),
                    _const(ERP_SOURCE, m),
                    attrs,
                    _version(updated),
                ],
                ERP_LEDGER_ENTRIES,
            )
        )
    # rejected drafts are generated in index order, like period_closed_msg
    for slot, kind in ((2, "payment"), (3, "payment"), (4, "credit_memo")):
        r = np.flatnonzero(ch.e_exists[slot])
        m = len(r)
        if slot == 2:
            ext = fixed_ids("py_", j[ch.payer[r]] * 4 + 1, 11)
        elif slot == 3:
            ext = fixed_ids("py_", j[r] * 4 + 2, 11)
        else:
            credit = ch.s3_is_credit[r]
            ext = pc.if_else(pa.array(credit), fixed_ids("cn_", j[r] * 4 + 3, 11), fixed_ids("re_", j[r] * 4 + 3, 11))
        posted = ch.e_posted[slot][r]
        parts.append(
            _table(
                [
                    fixed_ids("le_", j[r] * 10 + slot, 11),
                    _const(kind, m),
                    ext,
                    cus_ids.take(pa.array(r)),
                    _pick(_REGIONS, ch.region[r]),
                    _pick(_CURRENCIES, ch.currency[r]),
                    pa.array(ch.e_amount[slot][r], pa.int64()),
                    _const("posted", m),
                    inv_ids.take(pa.array(r)),
                    _ts(posted),
                    _date32(posted),
                    _ts(posted),
                    _const(ERP_SOURCE, m),
                    _empty_map(m),
                    _version(posted),
                ],
                ERP_LEDGER_ENTRIES,
            )
        )
    return pa.concat_tables(parts)
