"""Canonical models every component shares. Money is Int64 minor units plus an ISO 4217 currency."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

# The largest amount the tower takes, in minor units (10 trillion units of a two-decimal currency): ClickHouse's
# sums of Int64 wrap silently, and a statement summed from amounts near 2**62 showed negative totals.
MAX_AMOUNT_MINOR = 10**15


# The drift classes of DOMAIN.md section 3 (reconciler/classify.py names each): what a per-class setting may name.
DRIFT_CLASSES: tuple[str, ...] = (
    "missing_in_erp",
    "missing_in_billing",
    "amount_mismatch",
    "currency_mismatch",
    "status_mismatch",
    "duplicate_posting",
    "payment_unapplied",
    "orphan_payment",
    "under_applied",
    "over_applied",
    "customer_unsynced",
    "customer_unmatched",
    "refund_unposted",
    "region_mismatch",
    "stale_sync",
)
# The classes whose gap is a timing one (one side not there yet): inside their grace period it is stale_sync.
GRACE_CLASSES: tuple[str, ...] = ("missing_in_erp", "payment_unapplied", "refund_unposted", "customer_unsynced")


def amount_error(amount_minor: int) -> str | None:
    """Why ``amount_minor`` is not an amount the tower takes (None when it is)."""
    if abs(amount_minor) > MAX_AMOUNT_MINOR:
        return f"{amount_minor} minor units is beyond the {MAX_AMOUNT_MINOR:,} the tower takes"
    return None


# ISO 4217 (list one, active codes with a minor unit): the minor-unit exponent of every currency. A currency
# missing here is refused where money is converted (connectors), never guessed: a guess of 2 decimals posts
# 100x too much for KRW and a tenth of it for KWD.
_ISO_4217_EXPONENTS = {
    0: "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF",
    2: "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN BWP BYN BZD CAD CDF "
    "CHE CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD "
    "HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU "
    "MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG "
    "SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH USD USN UYU UZS VED VES WST "
    "XCD XCG YER ZAR ZMW ZWG",
    3: "BHD IQD JOD KWD LYD OMR TND",
    4: "CLF UYW",
}
CURRENCY_EXPONENT: dict[str, int] = {c: e for e, codes in _ISO_4217_EXPONENTS.items() for c in codes.split()}
REGIONS = ("NA", "EU", "APAC")

InvoiceStatus = Literal["draft", "open", "paid", "void", "uncollectible"]
PaymentKind = Literal["payment", "refund", "credit_note"]
EntryType = Literal["invoice", "payment", "credit_memo", "journal"]


def currency_exponent(currency: str) -> int:
    """The ISO 4217 minor-unit exponent; ValueError for a code that is not an active currency."""
    try:
        return CURRENCY_EXPONENT[currency]
    except KeyError:
        raise ValueError(f"{currency!r} is not an ISO 4217 currency with a minor unit") from None


def format_money(amount_minor: int, currency: str) -> str:
    """Human display only; never feed the result back into arithmetic."""
    exp = CURRENCY_EXPONENT.get(currency)
    if exp is None:
        return f"{amount_minor:,} {currency} (minor units)"
    sign = "-" if amount_minor < 0 else ""
    whole, frac = divmod(abs(amount_minor), 10**exp)
    return f"{sign}{whole:,}{'.' + str(frac).zfill(exp) if exp else ''} {currency}"


@dataclass(frozen=True)
class Invoice:
    invoice_id: str
    customer_id: str
    region: str
    currency: str
    subtotal_minor: int
    tax_minor: int
    total_minor: int
    status: InvoiceStatus
    issued_at: dt.datetime
    updated_at: dt.datetime
    amount_paid_minor: int = 0
    amount_credited_minor: int = 0
    due_at: dt.datetime | None = None
    finalized_at: dt.datetime | None = None
    paid_at: dt.datetime | None = None
    source_system: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Payment:
    """A payment, refund or credit note from billing; ``allocations`` maps invoice id -> minor units."""

    payment_id: str
    kind: PaymentKind
    customer_id: str
    region: str
    currency: str
    amount_minor: int
    status: str
    occurred_at: dt.datetime
    updated_at: dt.datetime
    method: str = ""
    allocations: dict[str, int] = field(default_factory=dict)
    related_payment_id: str = ""
    source_system: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LedgerEntry:
    """An ERP posting; ``external_ref`` is the billing id it came from (the idempotency anchor)."""

    entry_id: str
    entry_type: EntryType
    external_ref: str
    party_ref: str
    region: str
    currency: str
    amount_minor: int
    status: str
    posted_at: dt.datetime
    updated_at: dt.datetime
    applied_to_ref: str = ""
    period_date: dt.date | None = None
    source_system: str = ""
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        """A posting that counts: not a rejected draft, not cancelled (reversed)."""
        return self.status not in NOT_POSTINGS


# Ledger entry statuses that are documents but not postings.
NOT_POSTINGS = ("draft", "cancelled")

T = TypeVar("T")


@dataclass(frozen=True)
class Skipped:
    """A source record a connector could not map (e.g. a currency the tower cannot represent exactly): passed
    over so one bad record does not stop every later change, and kept visible until it maps again."""

    ref: str
    reason: str


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a cursor-based pull; pass ``next_cursor`` back to continue, stop when ``done``. ``skipped``:
    the page's records that could not be mapped (the cursor still moves past them)."""

    items: list[T]
    next_cursor: str
    done: bool
    skipped: tuple[Skipped, ...] = ()


@dataclass(frozen=True)
class Customer:
    """A billing customer; ``customer_id`` is the join key across systems, ``parent_id`` the account parent."""

    customer_id: str
    name: str
    email: str
    region: str
    currency: str
    created_at: dt.datetime
    updated_at: dt.datetime
    parent_id: str = ""
    cdp_user_id: str = ""
    plan: str = ""
    tax_rate_bp: int = 0
    source_system: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CdpProfile:
    """A CDP profile (identity + account hierarchy); ``customer_id`` links it to billing."""

    cdp_user_id: str
    customer_id: str
    name: str
    email: str
    region: str
    updated_at: dt.datetime
    parent_id: str = ""
    source_system: str = ""
    traits: dict[str, str] = field(default_factory=dict)


# The id a source record is known by, per record type (what a skipped record is listed under).
REF_FIELD: dict[type, str] = {
    Invoice: "invoice_id",
    Payment: "payment_id",
    LedgerEntry: "entry_id",
    Customer: "customer_id",
    CdpProfile: "cdp_user_id",
}


def record_ref(cls: type, record: Any) -> str:
    """That id, from a record or from its raw JSON object ('' when it has none)."""
    name = REF_FIELD.get(cls, "")
    value = record.get(name) if isinstance(record, dict) else getattr(record, name, "")
    return value if isinstance(value, str) else ""


def key_ref(key_type: str, value: str) -> str:
    """How an event names each business key it carries (business_events.KeyRefs, migration 0021)."""
    return f"{key_type}:{value}"


def split_key_ref(ref: str) -> tuple[str, str]:
    """``key_ref``'s inverse: (key type, value)."""
    key_type, _, value = ref.partition(":")
    return key_type, value
