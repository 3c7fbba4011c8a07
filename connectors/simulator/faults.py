"""Fault names, their expected drift classes (docs/contracts.md), rates and the ground-truth manifest.

Pure data: no IO. A manifest lists every fault the generator injected, with the drift item the reconciler
must report for it (``expected_class`` + the primary key), so recall and precision are exact set compares.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True)
class FaultSpec:
    """What one fault is: its expected drift class, the key that identifies the drift item, and what the
    rate is a share of (``invoices``, ``customers`` or ``time``)."""

    expected_class: str | None
    key: str | None
    systems: tuple[str, ...]
    rate_of: str


# The contract table of docs/contracts.md. ``erp_posting_delayed`` is ``stale_sync`` only when the posting is
# still missing at ``as_of`` (decided per fault, see generate.py); posted-late ones expect no drift.
FAULTS: dict[str, FaultSpec] = {
    "erp_posting_delayed": FaultSpec("stale_sync", "invoice_id", ("billing", "erp"), "invoices"),
    "erp_posting_missing": FaultSpec("missing_in_erp", "invoice_id", ("billing", "erp"), "invoices"),
    "amount_mismatch": FaultSpec("amount_mismatch", "invoice_id", ("billing", "erp"), "invoices"),
    "currency_mismatch": FaultSpec("currency_mismatch", "invoice_id", ("billing", "erp"), "invoices"),
    "duplicate_erp_posting": FaultSpec("duplicate_posting", "invoice_id", ("erp",), "invoices"),
    "payment_not_applied": FaultSpec("payment_unapplied", "payment_id", ("billing", "erp"), "invoices"),
    "orphan_payment": FaultSpec("orphan_payment", "payment_id", ("billing",), "invoices"),
    "status_mismatch": FaultSpec("status_mismatch", "invoice_id", ("billing", "erp"), "invoices"),
    "partial_payment_under_applied": FaultSpec("under_applied", "invoice_id", ("billing", "erp"), "invoices"),
    "refund_not_posted": FaultSpec("refund_unposted", "payment_id", ("billing", "erp"), "invoices"),
    "duplicate_webhook": FaultSpec(None, None, ("billing",), "invoices"),
    "customer_missing_in_billing": FaultSpec("customer_unsynced", "customer_id", ("cdp", "billing"), "customers"),
    # a billing customer the ERP has no party for: its postings carry no party reference
    "erp_party_unmapped": FaultSpec("customer_unmatched", "customer_id", ("billing", "erp"), "customers"),
    "erp_outage": FaultSpec(None, None, ("erp",), "time"),
    "erp_business_rejection": FaultSpec("missing_in_erp", "invoice_id", ("billing", "erp"), "invoices"),
}
FAULT_NAMES: tuple[str, ...] = tuple(FAULTS)


# The invoice faults drawn from one pool of eligible invoices, one fault each (connectors/simulator/generate.py).
POOLED_INVOICE_FAULTS = (
    "erp_posting_delayed",
    "erp_posting_missing",
    "amount_mismatch",
    "currency_mismatch",
    "duplicate_erp_posting",
    "payment_not_applied",
    "status_mismatch",
    "partial_payment_under_applied",
    "refund_not_posted",
    "duplicate_webhook",
    "erp_business_rejection",
)


@dataclass(frozen=True)
class FaultRates:
    """One rate per fault (0 = off). Invoice faults are a share of invoices, ``customer_missing_in_billing``
    and ``erp_party_unmapped`` a share of customers, ``erp_outage`` the share of the estate's time the ERP is
    down."""

    erp_posting_delayed: float = 0.0
    erp_posting_missing: float = 0.0
    amount_mismatch: float = 0.0
    currency_mismatch: float = 0.0
    duplicate_erp_posting: float = 0.0
    payment_not_applied: float = 0.0
    orphan_payment: float = 0.0
    status_mismatch: float = 0.0
    partial_payment_under_applied: float = 0.0
    refund_not_posted: float = 0.0
    duplicate_webhook: float = 0.0
    customer_missing_in_billing: float = 0.0
    erp_party_unmapped: float = 0.0
    erp_outage: float = 0.0
    erp_business_rejection: float = 0.0

    def __post_init__(self) -> None:
        for name, value in self.as_dict().items():
            if not 0.0 <= value <= 0.2:
                raise ValueError(f"fault rate {name}={value} must be within [0, 0.2]")
        pooled = {name: getattr(self, name) for name in POOLED_INVOICE_FAULTS if getattr(self, name)}
        if sum(pooled.values()) > 1.0 + 1e-9:  # else the later faults got no invoice, and the manifest still said
            raise ValueError(
                f"the rates of {', '.join(pooled)} add up to {sum(pooled.values()):.2f}: each invoice carries at "
                "most one of these faults, so their rates must add up to 1 or less"
            )

    @classmethod
    def clean(cls) -> FaultRates:
        """No faults at all: the estate must reconcile to zero drift."""
        return cls()

    @classmethod
    def default(cls) -> FaultRates:
        """The demo mix: every fault present, about 4% of invoices affected."""
        return cls(
            erp_posting_delayed=0.01,
            erp_posting_missing=0.005,
            amount_mismatch=0.005,
            currency_mismatch=0.002,
            duplicate_erp_posting=0.003,
            payment_not_applied=0.005,
            orphan_payment=0.002,
            status_mismatch=0.003,
            partial_payment_under_applied=0.003,
            refund_not_posted=0.003,
            duplicate_webhook=0.01,
            customer_missing_in_billing=0.01,
            erp_party_unmapped=0.002,
            erp_outage=0.01,
            erp_business_rejection=0.002,
        )

    @classmethod
    def only(cls, **rates: float) -> FaultRates:
        """Just the named faults, e.g. ``FaultRates.only(erp_posting_missing=0.01)``."""
        unknown = set(rates) - set(FAULT_NAMES)
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(sorted(unknown))}")
        return cls(**rates)

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def is_clean(self) -> bool:
        return not any(self.as_dict().values())


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class InjectedFault:
    """One injected fault. ``keys`` identify the resulting drift item (``invoice_id``, ``payment_id``,
    ``customer_id``, ``ledger_entry_id`` as applicable); ``detail`` says how (variant, window end...)."""

    fault: str
    expected_class: str | None
    keys: dict[str, str]
    systems: tuple[str, ...]
    region: str
    at: dt.datetime
    detail: dict[str, str] = field(default_factory=dict)

    @property
    def primary_key(self) -> str | None:
        """The value of the key a matching drift item must carry (None for faults that expect no drift)."""
        key = FAULTS[self.fault].key
        return self.keys.get(key) if key else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fault": self.fault,
            "expected_class": self.expected_class,
            "keys": dict(sorted(self.keys.items())),
            "systems": list(self.systems),
            "region": self.region,
            "at": _iso(self.at),
            "detail": dict(sorted(self.detail.items())),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> InjectedFault:
        at = dt.datetime.fromisoformat(doc["at"].replace("Z", "+00:00"))
        return cls(
            doc["fault"],
            doc["expected_class"],
            dict(doc["keys"]),
            tuple(doc["systems"]),
            doc["region"],
            at,
            dict(doc.get("detail", {})),
        )

    def sort_key(self) -> tuple[str, str, str]:
        return (self.fault, orjson.dumps(self.keys, option=orjson.OPT_SORT_KEYS).decode(), _iso(self.at))


@dataclass
class Manifest:
    """Ground truth of one estate: every injected fault, in a canonical order."""

    seed: int
    faults: list[InjectedFault] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def extend(self, faults: Iterable[InjectedFault]) -> None:
        self.faults.extend(faults)
        self.faults.sort(key=InjectedFault.sort_key)

    def __iter__(self) -> Iterator[InjectedFault]:
        return iter(self.faults)

    def __len__(self) -> int:
        return len(self.faults)

    def of(self, fault: str) -> list[InjectedFault]:
        return [f for f in self.faults if f.fault == fault]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(FAULT_NAMES, 0)
        for f in self.faults:
            out[f.fault] += 1
        return out

    def expected(self) -> set[tuple[str, str]]:
        """(drift class, primary key value) of every drift item the reconciler must report, and no others."""
        out = set()
        for f in self.faults:
            if f.expected_class is not None and f.primary_key is not None:
                out.add((f.expected_class, f.primary_key))
        return out

    def to_json(self) -> str:
        """Canonical JSON: byte-identical for the same seed and configuration."""
        doc = {"seed": self.seed, "config": self.config, "faults": [f.to_dict() for f in self.faults]}
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        doc = orjson.loads(text)
        return cls(doc["seed"], [InjectedFault.from_dict(f) for f in doc["faults"]], doc.get("config", {}))
