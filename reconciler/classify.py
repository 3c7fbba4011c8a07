"""Drift classification rules (DOMAIN.md §3): pure functions over per-key facts, no IO.

The store computes the facts set-based in ClickHouse (tower_core/store/reconcile.py): one row per invoice,
payment or customer key with both sides' values, and drops every key whose sides match exactly. What is
left — the candidates, a small share of the estate — is classified here into at most one finding per key,
by priority, so a single root cause never shows up as several items (an unapplied payment explains why its
invoice is still open in the ERP; a duplicate posting explains why the ERP total is twice the invoice).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tower_core.models import DRIFT_CLASSES
from tower_core.settings import DEFAULT_GRACE_S, DEFAULT_TOLERANCE_ABS_MINOR

# --- classes ----------------------------------------------------------------------------------------------
MISSING_IN_ERP = "missing_in_erp"
MISSING_IN_BILLING = "missing_in_billing"
AMOUNT_MISMATCH = "amount_mismatch"
CURRENCY_MISMATCH = "currency_mismatch"
STATUS_MISMATCH = "status_mismatch"
DUPLICATE_POSTING = "duplicate_posting"
PAYMENT_UNAPPLIED = "payment_unapplied"
ORPHAN_PAYMENT = "orphan_payment"
UNDER_APPLIED = "under_applied"
OVER_APPLIED = "over_applied"
CUSTOMER_UNSYNCED = "customer_unsynced"
CUSTOMER_UNMATCHED = "customer_unmatched"
REFUND_UNPOSTED = "refund_unposted"
REGION_MISMATCH = "region_mismatch"
STALE_SYNC = "stale_sync"

CLASSES: tuple[str, ...] = DRIFT_CLASSES  # in tower_core.models, where settings check the names they are given
# Statement buckets that explain a difference without being drift: amounts inside the tolerance, a posting on
# another day than the invoice's, and a side that records no region (its amount is in the blank region's row).
TOLERANCE = "within_tolerance"
REGION_UNRECORDED = "region_unrecorded"  # ('timing' is the third, the statement SQL's alone)

# Reason codes: class -> the codes it may carry, with what each means.
REASONS: dict[str, str] = {
    "not_posted": "billing invoice finalized, no ERP posting after the grace period",
    "erp_rejected": "the ERP refused the posting (business rule); see the remote message",
    "posting_pending": "ERP posting not there yet, still inside the grace period",
    "application_pending": "ERP payment application not there yet, still inside the grace period",
    "credit_memo_pending": "ERP credit memo not there yet, still inside the grace period",
    "customer_pending": "billing customer not updated yet, still inside the grace period",
    "not_in_billing": "ERP posting references a billing id that billing does not know",
    "failed_in_billing": "the ERP posted a payment, refund or credit note that failed or was voided in billing",
    "amount_rounding": "amounts differ by at most one major unit's rounding step",
    "amount_tax": "the difference equals the invoice tax (tax missing or added on one side)",
    "amount_differs": "amounts differ beyond the tolerance (FX or a changed invoice)",
    "currency_differs": "the ERP posted the invoice in another currency",
    "posted_in_other_region": "the ERP booked the invoice in another region (entity) than billing's",
    "paid_but_open": "billing says paid, the ERP invoice is still open",
    "open_but_paid": "billing says open, the ERP invoice is paid",
    "voided_but_posted": "billing voided the invoice, the ERP posting is still live",
    "draft_but_posted": "billing has not finalized the invoice (a draft), the ERP posted it",
    "posted_twice": "the same billing invoice is posted more than once in the ERP",
    "not_applied": "payment succeeded in billing, no ERP application after the grace period",
    "no_invoice": (
        "payment allocated to no invoice, and the customer's open invoices do not match it unambiguously: none or "
        "several equal it, and together they do not sum to it"
    ),
    "booked_unapplied": "the ERP booked the payment billing allocated, but applied it to no invoice (after the grace "
    "period)",
    "matched_not_applied": "unallocated payment matched to the customer's open invoices by amount; not in the ERP",
    "applied_less": "the ERP applied less to the invoice than billing allocated",
    "applied_more": "the ERP applied more to the invoice than billing allocated",
    "credit_memo_missing": "refund / credit note in billing, no ERP credit memo after the grace period",
    "credit_memo_differs": "the ERP credit memo's amount differs from the refund / credit note beyond the tolerance",
    "credit_memo_currency": "the ERP booked the refund's / credit note's credit memo in another currency",
    "application_currency": "the ERP applied the payment in another currency than billing collected it",
    "application_differs": "the ERP applied a payment billing allocated nowhere for another amount than it collected",
    "profile_not_in_billing": "CDP profile changed, billing customer missing or older after the grace period",
    "no_erp_party": "ERP postings of a billing customer carry no or another party reference",
}

# Technical classes a corrective sync may repair on its own (when enabled); business-rule classes wait for a
# person's approval; the rest have no connector operation and are worked in the exception queue.
TECHNICAL = frozenset({MISSING_IN_ERP, PAYMENT_UNAPPLIED, REFUND_UNPOSTED})
BUSINESS = frozenset({AMOUNT_MISMATCH, CURRENCY_MISMATCH, DUPLICATE_POSTING})

# Which key identifies an item of each class (the manifest's primary key).
PRIMARY_KEY: dict[str, str] = {
    MISSING_IN_ERP: "invoice_id",
    MISSING_IN_BILLING: "ledger_entry_id",
    AMOUNT_MISMATCH: "invoice_id",
    CURRENCY_MISMATCH: "invoice_id",
    STATUS_MISMATCH: "invoice_id",
    DUPLICATE_POSTING: "invoice_id",
    PAYMENT_UNAPPLIED: "payment_id",
    ORPHAN_PAYMENT: "payment_id",
    UNDER_APPLIED: "invoice_id",
    OVER_APPLIED: "invoice_id",
    CUSTOMER_UNSYNCED: "customer_id",
    CUSTOMER_UNMATCHED: "customer_id",
    REFUND_UNPOSTED: "payment_id",
    REGION_MISMATCH: "invoice_id",
}

# --- queue states -----------------------------------------------------------------------------------------
NEW, PERSISTING, RESOLVED, ACKNOWLEDGED, IGNORED = "new", "persisting", "resolved", "acknowledged", "ignored"
STATES = (NEW, PERSISTING, RESOLVED, ACKNOWLEDGED, IGNORED)
OPEN_STATES = (NEW, PERSISTING, ACKNOWLEDGED, IGNORED)

AGE_BUCKETS = ("0-1d", "2-7d", "8-30d", ">30d")


def age_bucket(first_seen: dt.datetime, as_of: dt.datetime) -> str:
    """Aging bucket by whole days since first seen: 0–1, 2–7, 8–30, more than 30."""
    days = (as_of - first_seen).days
    if days <= 1:
        return AGE_BUCKETS[0]
    if days <= 7:
        return AGE_BUCKETS[1]
    if days <= 30:
        return AGE_BUCKETS[2]
    return AGE_BUCKETS[3]


def age_bucket_bounds(bucket: str) -> tuple[int, int | None]:
    """[min_days, max_days] of a bucket (None = open-ended), for filtering in SQL."""
    return {"0-1d": (0, 1), "2-7d": (2, 7), "8-30d": (8, 30), ">30d": (31, None)}[bucket]


def drift_id(cls: str, primary_key: str) -> str:
    """Stable id of (class, primary key): a re-detection updates the same item. Same as the SQL's."""
    return hashlib.sha256(f"{cls}:{primary_key}".encode()).hexdigest()[:32]


def run_transition(current: str | None, detected: bool, set_by_unfinished_run: bool = False) -> str | None:
    """State after a run compared the item's key. None = no item. Operator states survive re-detection. An item
    made new by a run that never finished (its process was lost after the queue stage) stays new: no finished
    run has reported it yet, and the next one counts it as new."""
    if detected:
        if current in (None, RESOLVED) or (current == NEW and set_by_unfinished_run):
            return NEW
        if current in (NEW, PERSISTING):
            return PERSISTING
        return current  # acknowledged / ignored stay as the person left them
    if current is None or current == RESOLVED:
        return current
    return RESOLVED


class TransitionError(ValueError):
    """A person asked for a transition the queue does not allow."""


def manual_transition(current: str, target: str, note: str) -> str:
    """Acknowledge or ignore an item; either needs a note (the why of the audit record)."""
    if target not in (ACKNOWLEDGED, IGNORED):
        raise TransitionError(f"an item can be acknowledged or ignored, not set to {target!r}")
    if current == RESOLVED:
        raise TransitionError("the item is resolved; there is nothing to acknowledge or ignore")
    if current == target:
        raise TransitionError(f"the item is already {target}")
    if not note.strip():
        verb = "ignoring" if target == IGNORED else "acknowledging"
        raise TransitionError(f"{verb} an item needs a note saying why")
    if current == IGNORED and target == ACKNOWLEDGED:
        raise TransitionError("an ignored item cannot be acknowledged")
    return target


CLOSED = (RESOLVED, IGNORED)  # states with nothing left to correct


def operator_acts(state: str, policy: str) -> dict[str, bool]:
    """Which of corrective sync, acknowledge and ignore an operator may ask of an item in ``state`` with this
    policy (``reconciler.policy.decision``): what the API takes, so the dashboard offers these and no others."""

    def takes(target: str) -> bool:
        try:
            manual_transition(state, target, "a note")
        except TransitionError:
            return False
        return True

    return {
        "sync": policy != "manual" and state not in CLOSED,
        "acknowledge": takes(ACKNOWLEDGED),
        "ignore": takes(IGNORED),
    }


# --- rules ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """Absolute minor units and relative basis points; a difference within either is tolerated."""

    abs_minor: int = 0
    rel_bp: int = 0

    def within(self, billing: int, erp: int) -> bool:
        diff = abs(billing - erp)
        return diff <= self.abs_minor or diff * 10_000 <= self.rel_bp * abs(billing)


@dataclass(frozen=True)
class Rules:
    """Tolerances per currency, grace periods per class (seconds), and the 1:N matching date window."""

    tolerances: Mapping[str, Tolerance] = field(default_factory=dict)
    default_tolerance: Tolerance = Tolerance()
    grace_s: Mapping[str, int] = field(default_factory=dict)
    default_grace_s: int = 86_400
    match_window_days: int = 31

    def tolerance(self, currency: str) -> Tolerance:
        return self.tolerances.get(currency, self.default_tolerance)

    def grace(self, cls: str) -> dt.timedelta:
        return dt.timedelta(seconds=self.grace_s.get(cls, self.default_grace_s))

    @classmethod
    def from_settings(cls, settings: Any) -> Rules:
        abs_map = dict(settings.reconcile_tolerance_abs_minor)
        rel_map = dict(settings.reconcile_tolerance_rel_bp)
        # a map naming some currencies or classes only keeps the documented default for the rest (a grace for
        # one class made every other class's 24 h, hiding unposted invoices as stale_sync for 22 h more)
        default = Tolerance(int(abs_map.pop("*", DEFAULT_TOLERANCE_ABS_MINOR)), int(rel_map.pop("*", 0)))
        currencies = set(abs_map) | set(rel_map)
        tolerances = {
            c: Tolerance(int(abs_map.get(c, default.abs_minor)), int(rel_map.get(c, default.rel_bp)))
            for c in currencies
        }
        grace = {k: int(v) for k, v in settings.reconcile_grace_s.items()}
        return cls(
            tolerances=tolerances,
            default_tolerance=default,
            grace_s=grace,
            default_grace_s=int(grace.get("*", DEFAULT_GRACE_S)),
            match_window_days=int(settings.reconcile_match_window_days),
        )


@dataclass
class Finding:
    """One classified difference: becomes (or updates) a drift item."""

    cls: str
    reason: str
    system: str
    region: str
    currency: str
    day: dt.date
    amount_minor: int
    customer_id: str = ""
    invoice_id: str = ""
    payment_id: str = ""
    ledger_entry_id: str = ""
    billing: dict[str, str] = field(default_factory=dict)
    erp: dict[str, str] = field(default_factory=dict)
    key_type: str = "invoice"  # which comparison found it: invoice, payment or customer

    @property
    def primary_key(self) -> str:
        """The class's identifying key; stale_sync items take the key of the comparison that found them."""
        if self.cls == MISSING_IN_BILLING:
            return self.ledger_entry_id
        return {"invoice": self.invoice_id, "payment": self.payment_id, "customer": self.customer_id}[self.key_type]

    @property
    def drift_id(self) -> str:
        return drift_id(self.cls, self.primary_key)

    @property
    def diff_fields(self) -> list[str]:
        """Fields whose values differ between the sides (a field on one side only counts as differing)."""
        names = sorted(set(self.billing) | set(self.erp))
        return [n for n in names if self.billing.get(n) != self.erp.get(n)]


def _s(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%S")
    return "" if value is None else str(value)


def _day(value: dt.datetime | dt.date | None, fallback: dt.datetime) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return fallback.date()


def aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _inside_grace(since: dt.datetime | None, as_of: dt.datetime, grace: dt.timedelta) -> bool:
    since = aware(since)
    return since is not None and since.year > 1971 and as_of - since <= grace


def _amount_reason(billing_total: int, erp_amount: int, tax: int, subtotal: int, currency_exp: int) -> str:
    diff = abs(billing_total - erp_amount)
    if tax and (diff == abs(tax) or erp_amount == subtotal):
        return "amount_tax"
    if diff < 10**currency_exp or diff <= 1:
        return "amount_rounding"
    return "amount_differs"


INVOICE_FINAL_STATUSES = ("open", "paid", "uncollectible")


def classify_invoice(f: Mapping[str, Any], rules: Rules, as_of: dt.datetime) -> Finding | None:
    """One invoice key's facts (columns of the store's invoice facts query) -> at most one finding.

    Priority: ERP-only posting, void-but-posted, missing posting (or inside grace), duplicate, currency,
    amount, region, payment application, status.
    """
    from tower_core.models import CURRENCY_EXPONENT

    key = f["key"]
    in_billing = bool(f["b_n"])
    status = f["b_status"] or ""
    currency = f["b_currency"] or f["e_currency"] or ""
    region = f["b_region"] or f["e_region"] or ""
    e_n = int(f["e_n"])
    b_total = int(f["b_total"] or 0)
    e_amount = int(f["e_amount"] or 0)
    billing = {
        "status": status,
        "currency": f["b_currency"] or "",
        "total_minor": _s(b_total),
        "customer_id": f["b_customer"] or "",
    }
    erp = {
        "status": f["e_status"] or "",
        "currency": f["e_currency"] or "",
        "total_minor": _s(e_amount),
        "customer_id": f["e_party"] or "",
    }
    day = _day(f["b_issued"] if in_billing else f["e_day"], as_of)
    base = {
        "region": region,
        "currency": currency,
        "day": day,
        "customer_id": f["b_customer"] or f["e_party"] or "",
        "invoice_id": key,
        "ledger_entry_id": f["e_entry"] or "",
    }

    if not in_billing:
        if e_n == 0:
            return None
        return Finding(
            MISSING_IN_BILLING,
            "not_in_billing",
            "billing",
            amount_minor=-int(f["e_sum"] or 0),
            billing={"status": "", "total_minor": "", "currency": ""},
            erp={"status": erp["status"], "total_minor": _s(f["e_sum"]), "currency": erp["currency"]},
            **base,
        )
    if status not in INVOICE_FINAL_STATUSES:  # void or draft: nothing should be live in the ERP
        if e_n > 0:
            reason = "voided_but_posted" if status == "void" else "draft_but_posted"
            return Finding(
                STATUS_MISMATCH, reason, "erp", amount_minor=-int(f["e_sum"] or 0), billing=billing, erp=erp, **base
            )
        return None
    if e_n == 0:
        erp = {"status": "", "currency": "", "total_minor": "", "customer_id": ""}
        rejected = f.get("rejected") or ""
        finalized = aware(f["b_finalized"])
        since = finalized if finalized is not None and finalized.year > 1971 else f["b_issued"]
        if not rejected and _inside_grace(since, as_of, rules.grace(MISSING_IN_ERP)):
            return Finding(STALE_SYNC, "posting_pending", "erp", amount_minor=b_total, billing=billing, erp=erp, **base)
        if rejected:
            erp["error"] = rejected
        reason = "erp_rejected" if rejected else "not_posted"
        return Finding(MISSING_IN_ERP, reason, "erp", amount_minor=b_total, billing=billing, erp=erp, **base)
    if e_n > 1:
        erp["postings"] = _s(e_n)
        erp["total_minor"] = _s(f["e_sum"])
        billing["postings"] = "1"
        return Finding(
            DUPLICATE_POSTING, "posted_twice", "erp", amount_minor=b_total - int(f["e_sum"] or 0), billing=billing,
            erp=erp, **base,
        )  # fmt: skip
    if (f["e_currency"] or "") != (f["b_currency"] or ""):
        return Finding(
            CURRENCY_MISMATCH, "currency_differs", "erp", amount_minor=b_total, billing=billing, erp=erp, **base,
        )  # fmt: skip
    if b_total != e_amount and not rules.tolerance(currency).within(b_total, e_amount):
        reason = _amount_reason(
            b_total, e_amount, int(f["b_tax"] or 0), int(f["b_subtotal"] or 0), CURRENCY_EXPONENT.get(currency, 2)
        )
        return Finding(
            AMOUNT_MISMATCH, reason, "erp", amount_minor=b_total - e_amount, billing=billing, erp=erp, **base
        )
    # an ERP that records no region (one entity) books in billing's; one that records another booked elsewhere
    b_region, e_region = f["b_region"] or "", f["e_region"] or ""
    if b_region and e_region and b_region != e_region:
        return Finding(
            REGION_MISMATCH, "posted_in_other_region", "erp", amount_minor=b_total,
            billing={**billing, "region": b_region}, erp={**erp, "region": e_region}, **base,
        )  # fmt: skip
    # payment side: allocations of payments the ERP knows, against what the ERP applied to this invoice
    alloc = int(f["b_alloc"] or 0) - int(f["b_alloc_unposted"] or 0)
    applied = int(f["e_applied"] or 0)
    pay_billing = {**billing, "allocated_minor": _s(alloc)}
    pay_erp = {**erp, "applied_minor": _s(applied)}
    if alloc != applied and not rules.tolerance(currency).within(alloc, applied):
        cls, reason = (UNDER_APPLIED, "applied_less") if applied < alloc else (OVER_APPLIED, "applied_more")
        return Finding(cls, reason, "erp", amount_minor=alloc - applied, billing=pay_billing, erp=pay_erp, **base)
    e_status = f["e_status"] or ""
    if int(f["b_alloc_unposted"] or 0) == 0 and int(f["b_credit_unposted"] or 0) == 0:
        if status == "paid" and e_status == "open":
            return Finding(STATUS_MISMATCH, "paid_but_open", "erp", amount_minor=0, billing=billing, erp=erp, **base)
        if status == "open" and e_status == "paid":
            return Finding(STATUS_MISMATCH, "open_but_paid", "erp", amount_minor=0, billing=billing, erp=erp, **base)
    return None


def classify_payment(f: Mapping[str, Any], rules: Rules, as_of: dt.datetime) -> Finding | None:
    """One payment / refund / credit-note key's facts -> at most one finding."""
    key = f["key"]
    kind = f["p_kind"] or ""
    billing = {
        "kind": kind,
        "status": f["p_status"] or "",
        "amount_minor": _s(f["p_amount"]),
        "currency": f["p_currency"] or "",
        "allocated_to": f["p_alloc_refs"] or "",
    }
    erp = {
        "kind": f["e_type"] or "",
        "status": f["e_status"] or "",
        "amount_minor": _s(f["e_sum"]) if int(f["e_n"]) else "",
        "currency": f["e_currencies"] or "",
        "allocated_to": f["e_applied_refs"] or "",
    }
    base = {
        "region": f["p_region"] or f["e_region"] or "",
        "currency": f["p_currency"] or f["e_currency"] or "",
        "day": _day(f["p_occurred"] if f["p_n"] else f["e_day"], as_of),
        "customer_id": f["p_customer"] or f["e_party"] or "",
        "payment_id": key,
        "ledger_entry_id": f["e_entry"] or "",
        "key_type": "payment",
    }
    if not f["p_n"]:
        if int(f["e_n"]) == 0:
            return None
        amount = -int(f["e_sum"] or 0)
        return Finding(
            MISSING_IN_BILLING, "not_in_billing", "billing", amount_minor=amount, billing=billing, erp=erp, **base
        )
    if (f["p_status"] or "") != "succeeded":
        if int(f["e_n"] or 0) == 0:
            return None
        # a refund that failed, a voided credit note, a failed payment: the ERP's live posting of it credits or
        # settles the receivable for money that never moved
        amount = -int(f["e_sum"] or 0)
        return Finding(
            MISSING_IN_BILLING, "failed_in_billing", "erp", amount_minor=amount, billing=billing, erp=erp, **base
        )
    amount = int(f["p_amount"] or 0)
    # every ERP row of the key in the billing currency: "EUR,USD" or "EUR" against "USD" differs
    currency_differs = (f["e_currencies"] or "") != (f["p_currency"] or "")
    if kind == "payment":
        if int(f["e_n"]) > 0 and currency_differs:  # billing's amount: minor units of two currencies never subtract
            return Finding(
                CURRENCY_MISMATCH, "application_currency", "erp", amount_minor=amount, billing=billing, erp=erp, **base
            )
        n_alloc = int(f["p_alloc_n"] or 0)
        reason = "not_applied"
        if n_alloc == 0:
            if int(f["e_applied_n"] or 0) > 0:
                # the ERP applied it to invoices: the ERP side holds the match, but not for another amount (no
                # invoice's comparison sees it: billing allocated it nowhere)
                booked = int(f["e_sum"] or 0)
                if rules.tolerance(base["currency"]).within(amount, booked):
                    return None
                return Finding(
                    AMOUNT_MISMATCH, "application_differs", "erp", amount_minor=amount - booked, billing=billing,
                    erp=erp, **base,
                )  # fmt: skip
            if not f.get("sum_match"):
                return Finding(
                    ORPHAN_PAYMENT, "no_invoice", "billing", amount_minor=amount, billing=billing, erp=erp, **base
                )
            reason = "matched_not_applied"  # N:1 by customer and amount sum, but the ERP has nothing
        # applied in the ERP, or the cash of one matched by amount only is there: nothing to say
        if int(f["e_applied_n"] or 0) > 0 or (n_alloc == 0 and int(f["e_n"]) > 0):
            return None
        if int(f["e_n"]) > 0:
            reason = "booked_unapplied"  # the ERP holds the cash and applied it to no invoice
        if _inside_grace(f["p_occurred"], as_of, rules.grace(PAYMENT_UNAPPLIED)):
            return Finding(
                STALE_SYNC, "application_pending", "erp", amount_minor=amount, billing=billing, erp=erp, **base
            )
        return Finding(PAYMENT_UNAPPLIED, reason, "erp", amount_minor=amount, billing=billing, erp=erp, **base)
    if kind in ("refund", "credit_note"):
        if int(f["e_memo_n"] or 0) == 0:
            if _inside_grace(f["p_occurred"], as_of, rules.grace(REFUND_UNPOSTED)):
                return Finding(
                    STALE_SYNC, "credit_memo_pending", "erp", amount_minor=amount, billing=billing, erp=erp, **base
                )
            return Finding(
                REFUND_UNPOSTED, "credit_memo_missing", "erp", amount_minor=amount, billing=billing, erp=erp, **base
            )
        # credit memos are compared unsigned: ERPs book them positive or negative
        refunded, memo = abs(amount), int(f["e_memo_sum"] or 0)
        if currency_differs:
            return Finding(
                CURRENCY_MISMATCH, "credit_memo_currency", "erp", amount_minor=refunded, billing=billing, erp=erp,
                **base,
            )  # fmt: skip
        if not rules.tolerance(base["currency"]).within(refunded, memo):
            return Finding(
                AMOUNT_MISMATCH, "credit_memo_differs", "erp", amount_minor=refunded - memo, billing=billing, erp=erp,
                **base,
            )  # fmt: skip
        return None
    return None


def classify_customer(f: Mapping[str, Any], rules: Rules, as_of: dt.datetime) -> Finding | None:
    """A CDP profile changed and billing does not reflect it (after the grace period)."""
    billing = {"exists": "yes" if f["b_n"] else "no", "cdp_user_id": f["b_cdp_user"] or ""}
    cdp = {"exists": "yes", "cdp_user_id": f["c_cdp_user"] or "", "updated_at": _s(f["c_updated"])}
    base = {
        "region": f["region"] or "",
        "currency": "",
        "day": _day(f["c_updated"], as_of),
        "customer_id": f["key"],
        "key_type": "customer",
    }
    if _inside_grace(f["c_updated"], as_of, rules.grace(CUSTOMER_UNSYNCED)):
        return Finding(STALE_SYNC, "customer_pending", "billing", amount_minor=0, billing=billing, erp=cdp, **base)
    return Finding(
        CUSTOMER_UNSYNCED, "profile_not_in_billing", "billing", amount_minor=0, billing=billing, erp=cdp, **base
    )


def party_facts(invoice_facts: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per billing customer, its compared invoices whose ERP posting carries no or another party reference
    (the store's party facts): count, first day, first invoice and its posting, up to five parties seen."""
    found: dict[str, list[Mapping[str, Any]]] = {}
    for f in invoice_facts:
        customer = f["b_customer"] or ""
        if int(f["b_n"]) and int(f["e_n"]) and customer and (f["e_party"] or "") != customer:
            found.setdefault(customer, []).append(f)
    out = []
    for customer, rows in sorted(found.items()):
        first = min(rows, key=lambda r: r["key"])
        out.append(
            {
                "key": customer,
                "region": min(r["b_region"] or "" for r in rows),
                "first_day": min(r["b_day"] for r in rows),
                "invoices": len(rows),
                "invoice": first["key"],
                "entry": first["e_entry"] or "",
                "parties": ",".join(sorted({r["e_party"] or "" for r in rows})[:5]),
            }
        )
    return out


def classify_party(f: Mapping[str, Any], rules: Rules, as_of: dt.datetime) -> Finding | None:
    """A billing customer the ERP has no party for: its postings were booked to no or another party. No grace:
    a posting that exists already carries its party."""
    invoices = str(f["invoices"])
    return Finding(
        CUSTOMER_UNMATCHED,
        "no_erp_party",
        "erp",
        region=f["region"],
        currency="",
        day=_day(f["first_day"], as_of),
        amount_minor=0,
        customer_id=f["key"],
        invoice_id=f["invoice"],
        ledger_entry_id=f["entry"],
        billing={"customer_id": f["key"], "invoices": invoices},
        erp={"customer_id": f["parties"], "invoices": invoices},
        key_type="customer",
    )


def statement_class(finding: Finding | None, billing_minor: int, erp_minor: int) -> str:
    """The statement bucket explaining a candidate key's difference: its class, the tolerance, or '' (none)."""
    if finding is not None:
        return finding.cls
    return TOLERANCE if billing_minor != erp_minor else ""


def residual(billing_total: int, erp_total: int, explained: Mapping[str, int]) -> int:
    """What the classes do not explain: 0 whenever every difference is classified."""
    return billing_total - erp_total - sum(explained.values())
