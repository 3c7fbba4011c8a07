"""Estate configuration: size, time window, fault mix, and the timing profile (historical or demo pace)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from connectors.simulator.faults import FaultRates
from tower_core.models import CURRENCY_EXPONENT, REGIONS

# A fixed default window, so that ``EstateConfig()`` alone is deterministic.
DEFAULT_AS_OF = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
EARLIEST_START = dt.datetime(1972, 1, 1, tzinfo=dt.UTC)
MIN = 60_000  # ms
HOUR = 60 * MIN
DAY = 24 * HOUR


@dataclass(frozen=True)
class Timing:
    """Latencies and lags in milliseconds. ``historical`` spreads an estate over weeks; ``demo`` compresses
    the flows into seconds so a few minutes of demo show every step and fault."""

    name: str
    finalize_lag: tuple[int, int]  # invoice issued -> finalized
    erp_latency: tuple[int, int]  # billing change -> ERP posting (normal)
    erp_delay: tuple[int, int]  # erp_posting_delayed: posting latency (beyond the SLA)
    card_lag: tuple[int, int]  # invoice finalized -> card payment
    bank_lag: tuple[int, int]  # invoice finalized -> bank transfer
    refund_lag: tuple[int, int]  # payment -> refund
    credit_lag: tuple[int, int]  # finalized -> credit note
    retry_lag: tuple[int, int]  # failed payment attempt -> successful retry
    outage_len: tuple[int, int]  # one ERP outage window
    cdp_latency: tuple[int, int]  # CDP profile change -> billing customer update
    settle_margin: int  # clean billing changes stop this long before as_of so their ERP side is done
    fault_age: int  # faults that must be past any grace period happen at least this long before as_of
    stale_window: tuple[int, int]  # unposted delayed invoices were finalized this long before as_of
    customer_ramp: int  # new customers appear over this long after start (0: all exist before start)

    @property
    def fault_lead(self) -> int:
        """How long before ``as_of - fault_age`` a fault's invoice must be issued for all its events to fit."""
        return self.finalize_lag[1] + self.card_lag[1] + max(self.refund_lag[1], self.credit_lag[1]) + self.erp_delay[1]

    @classmethod
    def historical(cls) -> Timing:
        return cls(
            name="historical",
            finalize_lag=(1_000, 60_000),
            erp_latency=(5_000, 10 * MIN),
            erp_delay=(30 * MIN, 12 * HOUR),
            card_lag=(10_000, 2 * HOUR),
            bank_lag=(1 * DAY, 20 * DAY),
            refund_lag=(1 * HOUR, 5 * DAY),
            credit_lag=(1 * HOUR, 3 * DAY),
            retry_lag=(10 * MIN, 1 * DAY),
            outage_len=(10 * MIN, 60 * MIN),
            cdp_latency=(1_000, 2 * MIN),
            settle_margin=1 * HOUR,
            fault_age=3 * DAY,
            stale_window=(20 * MIN, 50 * MIN),
            customer_ramp=0,
        )

    @classmethod
    def demo(cls) -> Timing:
        return cls(
            name="demo",
            finalize_lag=(50, 500),
            erp_latency=(300, 8_000),
            erp_delay=(60_000, 180_000),
            card_lag=(1_000, 30_000),
            bank_lag=(20_000, 120_000),
            refund_lag=(10_000, 60_000),
            credit_lag=(2_000, 20_000),
            retry_lag=(2_000, 15_000),
            outage_len=(15_000, 40_000),
            cdp_latency=(100, 3_000),
            settle_margin=4 * MIN,  # the slowest clean ERP side (outage + latency + card/refund lags) lands by as_of
            fault_age=0,
            stale_window=(0, 0),
            customer_ramp=10_000,
        )


@dataclass(frozen=True)
class EstateConfig:
    """What to generate. Same config (seed included) -> same estate and byte-identical manifest."""

    seed: int = 7
    customers: int = 200
    invoices: int = 2_000
    regions: tuple[str, ...] = REGIONS
    start: dt.datetime = DEFAULT_AS_OF - dt.timedelta(days=60)
    as_of: dt.datetime = DEFAULT_AS_OF
    fault_rates: FaultRates = field(default_factory=FaultRates.default)
    context_loss_share: float = 0.3
    timing: Timing = field(default_factory=Timing.historical)
    chunk_invoices: int = 500_000  # generation unit (bulk writes one chunk at a time)
    id_offset: int = 0  # first invoice number (demo runs use a fresh range so ids never collide)

    def __post_init__(self) -> None:
        if self.customers < 1 or self.invoices < 0:
            raise ValueError("an estate needs at least one customer and a non-negative invoice count")
        if not 0 <= self.seed < 2**63:
            raise ValueError("the seed must be an integer from 0 to 2**63 - 1")
        if not self.regions or set(self.regions) - set(REGIONS):
            raise ValueError(f"regions must be a non-empty subset of {REGIONS}")
        for t in (self.start, self.as_of):
            if t.tzinfo is None:
                raise ValueError("start and as_of must be timezone-aware (UTC)")
        if self.as_of <= self.start:
            raise ValueError("as_of must be after start")
        if self.start < EARLIEST_START:
            # the tower reads a time in 1970-71 as "never set" (a zero DateTime64): an estate there would drift
            # differently from its manifest
            raise ValueError(f"the estate must start on or after {EARLIEST_START.date()}")
        if not 0.0 <= self.context_loss_share <= 1.0:
            raise ValueError("context_loss_share must be within [0, 1]")
        need = self.timing.fault_age + self.timing.fault_lead + 2 * DAY if self.timing.fault_age else 0
        if self.as_of_ms - self.start_ms < need:
            raise ValueError(f"a historical estate needs as_of - start >= {need / DAY:.1f} days (faults must age)")
        if self.chunk_invoices < 1:
            raise ValueError("chunk_invoices must be positive")

    @property
    def start_ms(self) -> int:
        return int(self.start.timestamp() * 1000)

    @property
    def as_of_ms(self) -> int:
        return int(self.as_of.timestamp() * 1000)

    @property
    def chunks(self) -> int:
        return max(1, -(-self.invoices // self.chunk_invoices))

    def replace(self, **changes: Any) -> EstateConfig:
        return dataclasses.replace(self, **changes)

    def summary(self) -> dict[str, Any]:
        """What the manifest records of the configuration (JSON-safe, canonical)."""
        return {
            "seed": self.seed,
            "customers": self.customers,
            "invoices": self.invoices,
            "regions": list(self.regions),
            "start": self.start.astimezone(dt.UTC).isoformat(),
            "as_of": self.as_of.astimezone(dt.UTC).isoformat(),
            "fault_rates": self.fault_rates.as_dict(),
            "context_loss_share": self.context_loss_share,
            "timing": self.timing.name,
            "chunk_invoices": self.chunk_invoices,
            "id_offset": self.id_offset,
        }


CURRENCIES_BY_REGION: dict[str, tuple[tuple[str, float], ...]] = {
    "NA": (("USD", 1.0),),
    "EU": (("EUR", 0.75), ("GBP", 0.25)),
    "APAC": (("JPY", 0.6), ("USD", 0.4)),
}
CURRENCIES = ("USD", "EUR", "GBP", "JPY")
assert all(c in CURRENCY_EXPONENT for c in CURRENCIES)
