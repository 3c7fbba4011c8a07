"""The estate generator: numpy-vectorized, deterministic for a seed, one chunk of invoices at a time.

Both modes use it: ``Estate.generate`` (in memory) turns the chunks' Arrow tables into records, the bulk
loader writes the same tables straight into the store. Customers and ERP outage windows are generated once
per estate (``rng([seed, 0])`` / ``rng([seed, 2])``, the customers without an ERP party ``rng([seed, 3])``);
invoice chunk ``k`` uses ``rng([seed, 1, k])``, so a chunk does not depend on the others. Times are integer
milliseconds since the epoch (UTC).

Every record's counterpart is derived from the same arrays, so a clean estate reconciles to zero by
construction; each fault changes exactly one thing (docs/simulator.md lists the footprints).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from connectors.simulator.config import CURRENCIES, CURRENCIES_BY_REGION, DAY, EstateConfig, Timing
from connectors.simulator.faults import FAULTS, POOLED_INVOICE_FAULTS, InjectedFault
from tower_core.models import CURRENCY_EXPONENT, REGIONS

REGION_WEIGHTS = {"NA": 0.45, "EU": 0.35, "APAC": 0.20}
EXP = np.array([CURRENCY_EXPONENT[c] for c in CURRENCIES], dtype=np.int64)
SCALE = 10**EXP  # minor units per major unit
FX = np.array([1.0, 0.92, 0.79, 150.0])  # major units per USD, same order as CURRENCIES
TAX_BP: dict[tuple[str, str], tuple[int, ...]] = {
    ("NA", "USD"): (0, 600, 725, 887),
    ("EU", "EUR"): (1900, 2000, 2100),
    ("EU", "GBP"): (2000,),
    ("APAC", "JPY"): (1000,),
    ("APAC", "USD"): (900,),
}
MONTHLY_USD = np.array([29, 49, 99, 199, 499, 999, 2499], dtype=np.int64)
MONTHLY_P = np.array([0.2, 0.25, 0.2, 0.15, 0.1, 0.07, 0.03])
ADJ = ("Blue", "North", "Bright", "Silver", "Rapid", "Quiet", "Bold", "Prime", "Clear", "Green", "Iron", "Lucky")
NOUN = ("Harbor", "Labs", "Systems", "Works", "Analytics", "Foods", "Logistics", "Media", "Cloud", "Health")
SUFFIX = {"NA": ("Inc", "LLC", "Corp"), "EU": ("GmbH", "Ltd", "BV"), "APAC": ("KK", "Pte Ltd", "Pty Ltd")}

# Invoice roles: the clean shapes first, then one per invoice-level fault.
R_PAID, R_OPEN, R_PARTIAL_OPEN, R_PARTIAL_FULL, R_MULTI_LEAD, R_MULTI_FOLLOW = 0, 1, 2, 3, 4, 5
R_CREDIT_PAID, R_REFUND, R_FAILED_PAID = 6, 7, 8
CLEAN_ROLES = (R_PAID, R_OPEN, R_PARTIAL_OPEN, R_PARTIAL_FULL, R_CREDIT_PAID, R_REFUND, R_FAILED_PAID)
CLEAN_P = np.array([0.66, 0.08, 0.04, 0.05, 0.04, 0.05, 0.03])
CLEAN_P = CLEAN_P / CLEAN_P.sum()
F_DELAYED, F_MISSING, F_AMOUNT, F_CURRENCY, F_DUP, F_UNAPPLIED, F_STATUS = 10, 11, 12, 13, 14, 15, 16
F_UNDER, F_REFUND_UNPOSTED, F_CN_UNPOSTED, F_DUP_WEBHOOK, F_REJECT = 17, 18, 19, 20, 21
# invoice-level faults in manifest order -> role (refund_not_posted splits into two roles below)
INVOICE_FAULT_ROLES: dict[str, int] = dict(
    zip(
        POOLED_INVOICE_FAULTS,  # whose rates FaultRates keeps within one pool
        (F_DELAYED, F_MISSING, F_AMOUNT, F_CURRENCY, F_DUP, F_UNAPPLIED, F_STATUS, F_UNDER, F_REFUND_UNPOSTED,
         F_DUP_WEBHOOK, F_REJECT),
        strict=True,
    )
)  # fmt: skip
METHODS = ("card", "bank_transfer")
AMOUNT_VARIANTS = ("rounding", "fx", "tax")


def fault_count(rng: np.random.Generator, rate: float, n: int) -> int:
    """Stochastic rounding of rate*n, at least one when the rate is on (so small estates show every fault)."""
    if rate <= 0 or n <= 0:
        return 0
    return max(1, int(np.floor(rate * n + rng.random())))


def log_uniform(rng: np.random.Generator, bounds: tuple[int, int], size: int) -> np.ndarray:
    """Latencies: most are short, a few long (log-uniform between the bounds, in ms)."""
    lo, hi = max(1, bounds[0]), max(1, bounds[1])
    if hi <= lo:
        return np.full(size, lo, dtype=np.int64)
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size)).astype(np.int64)


def fixed_ids(prefix: str, nums: np.ndarray, width: int) -> pa.StringArray:
    """``prefix`` + zero-padded numbers as an Arrow string array, built from one byte buffer (fast)."""
    p = np.frombuffer(prefix.encode(), dtype=np.uint8)
    n, length = len(nums), len(p) + width
    buf = np.empty((n, length), dtype=np.uint8)
    buf[:, : len(p)] = p
    x = np.asarray(nums, dtype=np.int64).copy()
    for i in range(width - 1, -1, -1):
        buf[:, len(p) + i] = 48 + (x % 10)
        x //= 10
    offsets = np.arange(0, (n + 1) * length, length, dtype=np.int64)
    if offsets[-1] < 2**31:
        return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(buf.reshape(-1)))
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buf.reshape(-1))).cast(pa.string())


def customer_ids(idx: np.ndarray) -> pa.StringArray:
    return fixed_ids("cus_", idx, 8)


def cdp_ids(idx: np.ndarray) -> pa.StringArray:
    return fixed_ids("usr_", idx, 8)


def invoice_ids(idx: np.ndarray) -> pa.StringArray:
    return fixed_ids("in_", idx, 10)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def ms_to_dt(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=int(ms))


def iso_ms(ms: int) -> str:
    return ms_to_dt(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def first_of_month_ms(ms: int) -> int:
    d = ms_to_dt(ms)
    return int(dt.datetime(d.year, d.month, 1, tzinfo=dt.UTC).timestamp() * 1000)


@dataclass
class Customers:
    """All customers: billing ones are ``0..n_billing-1``; ``n_billing..n-1`` exist only in the CDP
    (the customer_missing_in_billing faults)."""

    n_billing: int
    n: int
    region: np.ndarray
    currency: np.ndarray
    parent: np.ndarray
    annual: np.ndarray
    price_minor: np.ndarray
    tax_bp: np.ndarray
    adj: np.ndarray
    noun: np.ndarray
    suffix: np.ndarray
    cdp_created: np.ndarray
    cdp_updated: np.ndarray
    billing_created: np.ndarray
    billing_updated: np.ndarray
    email_version: np.ndarray
    upd_customer: np.ndarray  # profile updates (for the demo timeline): customer index
    upd_cdp_at: np.ndarray
    upd_billing_at: np.ndarray
    faults: list[InjectedFault] = field(default_factory=list)
    # billing customers the ERP has no party for (the erp_party_unmapped faults): their postings carry none
    unmapped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def generate_customers(cfg: EstateConfig) -> Customers:
    rng = np.random.default_rng([cfg.seed, 0])
    t = cfg.timing
    c = cfg.customers
    p = fault_count(rng, cfg.fault_rates.customer_missing_in_billing, c)
    n = c + p
    reg_codes = np.array([REGIONS.index(r) for r in cfg.regions])
    w = np.array([REGION_WEIGHTS[r] for r in cfg.regions])
    region = reg_codes[rng.choice(len(reg_codes), size=n, p=w / w.sum())]
    # account hierarchy: ~15% of billing customers are children of an earlier root account
    is_child = rng.random(n) < 0.15
    is_child[: min(n, 10)] = False
    is_child[c:] = False
    roots = np.flatnonzero(~is_child[:c])
    child = np.flatnonzero(is_child)
    before = np.searchsorted(roots, child)
    pick = roots[(rng.random(len(child)) * before).astype(np.int64)]
    parent = np.full(n, -1, dtype=np.int64)
    parent[child] = pick
    region[child] = region[pick]
    currency = np.zeros(n, dtype=np.int64)
    u = rng.random(n)
    for r_name, choices in CURRENCIES_BY_REGION.items():
        in_region = region == REGIONS.index(r_name)
        lo = 0.0
        for i, (cur, share) in enumerate(choices):
            hi = 1.01 if i == len(choices) - 1 else lo + share
            currency[in_region & (u >= lo) & (u < hi)] = CURRENCIES.index(cur)
            lo = hi
    currency[child] = currency[pick]
    annual = rng.random(n) < 0.25
    tier = rng.choice(len(MONTHLY_USD), size=n, p=MONTHLY_P)
    usd = MONTHLY_USD[tier] * np.where(annual, 10, 1)
    price_minor = np.round(usd * FX[currency]).astype(np.int64) * SCALE[currency]
    tax_bp = np.zeros(n, dtype=np.int64)
    pick_tax = rng.random(n)
    for (r_name, cur), rates in TAX_BP.items():
        m = (region == REGIONS.index(r_name)) & (currency == CURRENCIES.index(cur))
        tax_bp[m] = np.array(rates)[(pick_tax[m] * len(rates)).astype(np.int64)]
    adj = rng.integers(0, len(ADJ), n)
    noun = rng.integers(0, len(NOUN), n)
    suffix = rng.integers(0, 3, n)
    start, as_of = cfg.start_ms, cfg.as_of_ms
    cutoff = as_of - t.settle_margin
    if t.customer_ramp:
        cdp_created = start + rng.integers(0, t.customer_ramp, n)
    else:
        cdp_created = start - rng.integers(DAY, 720 * DAY, n)
    billing_created = cdp_created + log_uniform(rng, t.cdp_latency, n)
    # profile updates of billing customers (CDP -> billing), some during the window
    upd_n = c if t.customer_ramp else int(0.3 * c)
    upd_lo = start + t.customer_ramp
    upd_hi = max(upd_lo + 1, cutoff - t.cdp_latency[1])
    upd_customer = rng.integers(0, c, upd_n)
    upd_cdp_at = np.sort(rng.integers(upd_lo, upd_hi, upd_n))
    upd_billing_at = upd_cdp_at + log_uniform(rng, t.cdp_latency, upd_n)
    email_version = np.bincount(upd_customer, minlength=n).astype(np.int64)
    cdp_updated = cdp_created.copy()
    np.maximum.at(cdp_updated, upd_customer, upd_cdp_at)
    billing_updated = billing_created.copy()
    np.maximum.at(billing_updated, upd_customer, upd_billing_at)
    # prospects: a CDP profile change that never reached billing
    faults = []
    if p:
        hi = as_of - max(t.fault_age, 1) if t.fault_age else as_of
        at = rng.integers(start + t.customer_ramp, max(start + t.customer_ramp + 1, hi), p)
        cdp_created[c:] = at
        cdp_updated[c:] = at
        billing_created[c:] = 0
        billing_updated[c:] = 0
        ids = customer_ids(np.arange(c, n)).to_pylist()
        spec = FAULTS["customer_missing_in_billing"]
        for i, cid in enumerate(ids):
            faults.append(
                InjectedFault(
                    "customer_missing_in_billing",
                    spec.expected_class,
                    {"customer_id": cid, "cdp_user_id": "usr_" + cid[4:]},
                    spec.systems,
                    REGIONS[region[c + i]],
                    ms_to_dt(int(at[i])),
                )
            )
    # a stream of its own, so turning this fault on leaves every other draw of the estate as it was
    unmapped = np.zeros(n, dtype=bool)
    u_rng = np.random.default_rng([cfg.seed, 3])
    n_unmapped = min(c, fault_count(u_rng, cfg.fault_rates.erp_party_unmapped, c))
    unmapped[u_rng.choice(c, size=n_unmapped, replace=False)] = True
    return Customers(
        c,
        n,
        region,
        currency,
        parent,
        annual,
        price_minor,
        tax_bp,
        adj,
        noun,
        suffix,
        cdp_created,
        cdp_updated,
        billing_created,
        billing_updated,
        email_version,
        upd_customer,
        upd_cdp_at,
        upd_billing_at,
        faults,
        unmapped,
    )


@dataclass
class Outages:
    starts: np.ndarray
    ends: np.ndarray
    faults: list[InjectedFault] = field(default_factory=list)

    def shift(self, t: np.ndarray, rng: np.random.Generator, latency: tuple[int, int]) -> np.ndarray:
        """Postings that would fall inside an outage happen after it ends (plus a normal latency)."""
        if not len(self.starts) or not len(t):
            return t
        i = np.searchsorted(self.starts, t, side="right") - 1
        inside = (i >= 0) & (t < self.ends[np.maximum(i, 0)])
        out = t.copy()
        k = int(inside.sum())
        if k:
            out[inside] = self.ends[i[inside]] + log_uniform(rng, latency, k)
        return out

    def active(self, t_ms: int) -> bool:
        i = int(np.searchsorted(self.starts, t_ms, side="right")) - 1
        return i >= 0 and t_ms < int(self.ends[i])


def generate_outages(cfg: EstateConfig) -> Outages:
    rng = np.random.default_rng([cfg.seed, 2])
    t = cfg.timing
    lo = cfg.start_ms + t.customer_ramp
    hi = cfg.as_of_ms - t.settle_margin - t.outage_len[1] - t.erp_latency[1]
    rate = cfg.fault_rates.erp_outage
    if rate <= 0 or hi <= lo:
        return Outages(np.zeros(0, np.int64), np.zeros(0, np.int64))
    mean_len = (t.outage_len[0] + t.outage_len[1]) / 2
    k = fault_count(rng, rate, max(1, int((hi - lo) / mean_len)))
    starts = np.sort(rng.integers(lo, hi, k))
    ends = starts + rng.integers(t.outage_len[0], t.outage_len[1] + 1, k)
    # merge overlapping windows
    keep_s, keep_e = [int(starts[0])], [int(ends[0])]
    for s, e in zip(starts[1:].tolist(), ends[1:].tolist(), strict=True):
        if s <= keep_e[-1]:
            keep_e[-1] = max(keep_e[-1], e)
        else:
            keep_s.append(s)
            keep_e.append(e)
    spec = FAULTS["erp_outage"]
    faults = [
        InjectedFault("erp_outage", None, {}, spec.systems, "*", ms_to_dt(s), {"until": iso_ms(e)})
        for s, e in zip(keep_s, keep_e, strict=True)
    ]
    return Outages(np.array(keep_s, np.int64), np.array(keep_e, np.int64), faults)


def chunk_bounds(cfg: EstateConfig, k: int) -> tuple[int, int, int, int]:
    """(first invoice index, invoice count, window start, window end) of chunk ``k``."""
    chunks = cfg.chunks
    base, rem = divmod(cfg.invoices, chunks)
    n = base + (1 if k < rem else 0)
    j0 = k * base + min(k, rem)
    t = cfg.timing
    lo = cfg.start_ms + t.customer_ramp
    hi = cfg.as_of_ms - t.settle_margin - t.finalize_lag[1] - 1
    span = max(1, hi - lo)
    return j0, n, lo + span * k // chunks, lo + span * (k + 1) // chunks


@dataclass
class Chunk:
    """One chunk of invoices with their payments and ERP postings, as arrays (see module doc)."""

    k: int
    j: np.ndarray  # global invoice index
    cust: np.ndarray
    region: np.ndarray
    currency: np.ndarray
    subtotal: np.ndarray
    tax: np.ndarray
    total: np.ndarray
    usage: np.ndarray
    annual: np.ndarray
    issued: np.ndarray
    finalized: np.ndarray
    due: np.ndarray
    role: np.ndarray
    ctx_lost: np.ndarray
    dup_webhook: np.ndarray
    # payments by slot: 0 failed attempt, 1 first payment, 2 second payment, 3 refund / credit note
    p_exists: np.ndarray  # (4, n) bool
    p_time: np.ndarray  # (4, n)
    p_amount: np.ndarray  # (4, n)
    p_method: np.ndarray  # (4, n) index into METHODS
    s3_is_credit: np.ndarray  # slot 3 is a credit note (else a refund)
    payer: np.ndarray  # index (within chunk) of the invoice whose slot-1 payment settles this one, or -1
    alloc1: np.ndarray  # minor units of that payment allocated to this invoice
    # invoice final state
    amount_paid: np.ndarray
    amount_credited: np.ndarray
    paid: np.ndarray
    paid_at: np.ndarray
    updated: np.ndarray
    # ERP entries by slot: 0 invoice, 1 duplicate invoice, 2 application of slot-1 payment,
    # 3 application of slot-2 payment, 4 credit memo
    e_exists: np.ndarray  # (5, n)
    e_posted: np.ndarray  # (5, n)
    e_amount: np.ndarray  # (5, n)
    e_currency: np.ndarray  # invoice entry currency
    e_status: np.ndarray  # invoice entry: 0 open, 1 paid, 2 draft
    e_updated: np.ndarray  # invoice entry
    period_closed_msg: list[str]
    # orphan payments
    o_slot: np.ndarray  # invoice index (within chunk) whose id slot 3 the orphan uses
    o_cust: np.ndarray
    o_time: np.ndarray
    o_amount: np.ndarray
    o_region: np.ndarray
    o_currency: np.ndarray
    faults: list[InjectedFault] = field(default_factory=list)
    # per invoice: its customer has no ERP party (erp_party_unmapped), so its ERP entries carry none
    unmapped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    @property
    def n(self) -> int:
        return len(self.j)


def _min_diff(total: np.ndarray, currency: np.ndarray) -> np.ndarray:
    """The smallest injected amount difference: 5% of the total, at least one major unit."""
    return np.maximum(np.ceil(total * 0.05).astype(np.int64), SCALE[currency])


def generate_chunk(cfg: EstateConfig, cust: Customers, outages: Outages, k: int) -> Chunk:
    rng = np.random.default_rng([cfg.seed, 1, k])
    t: Timing = cfg.timing
    rates = cfg.fault_rates
    j0, n, t_lo, t_hi = chunk_bounds(cfg, k)
    as_of = cfg.as_of_ms
    cutoff = as_of - t.settle_margin
    j = np.arange(cfg.id_offset + j0, cfg.id_offset + j0 + n, dtype=np.int64)
    issued = np.sort(rng.integers(t_lo, max(t_lo + 1, t_hi), n))
    c = (cust.n_billing * rng.random(n) ** 1.3).astype(np.int64)
    # roles: clean shapes, then multi-invoice payment groups (consecutive invoices, one customer)
    role = np.array(CLEAN_ROLES)[rng.choice(len(CLEAN_ROLES), size=n, p=CLEAN_P)]
    leaders = np.flatnonzero((np.arange(n) % 3 == 0) & (np.arange(n) + 2 < n) & (rng.random(n) < 0.1))
    size = np.where(rng.random(len(leaders)) < 0.5, 2, 3)
    role[leaders] = R_MULTI_LEAD
    followers = np.concatenate([leaders + 1, leaders[size == 3] + 2]).astype(np.int64)
    follow_leader = np.concatenate([leaders, leaders[size == 3]]).astype(np.int64)
    role[followers] = R_MULTI_FOLLOW
    c[followers] = c[follow_leader]
    region = cust.region[c]
    currency = cust.currency[c]
    annual = cust.annual[c]
    has_usage = rng.random(n) < 0.6
    unit = np.where(currency == CURRENCIES.index("JPY"), rng.integers(1, 30, n), rng.integers(1, 20, n))
    usage = np.where(has_usage, rng.integers(1, 10_000, n) * unit, 0).astype(np.int64)
    subtotal = cust.price_minor[c] + usage
    tax = (subtotal * cust.tax_bp[c] + 5000) // 10000
    total = subtotal + tax
    finalized = issued + rng.integers(t.finalize_lag[0], t.finalize_lag[1] + 1, n)
    due = issued + 30 * DAY
    ctx_lost = rng.random(n) < cfg.context_loss_share

    # ---- faults: chosen among single (non-group) invoices old enough to be past any grace period
    longest = t.fault_lead
    eligible = np.flatnonzero(
        (role != R_MULTI_LEAD) & (role != R_MULTI_FOLLOW) & (issued <= as_of - t.fault_age - longest)
    )
    # rates are shares of the invoices that can carry a fault (a chunk at the end of the window has none)
    counts = {name: fault_count(rng, getattr(rates, name), len(eligible)) for name in INVOICE_FAULT_ROLES}
    counts["orphan_payment"] = fault_count(rng, rates.orphan_payment, len(eligible))
    room = len(eligible)
    for name in INVOICE_FAULT_ROLES:  # a tiny pool cannot hold one of each: the later faults give way
        counts[name] = min(counts[name], room)
        room -= counts[name]
    needed = sum(v for name, v in counts.items() if name != "orphan_payment")
    chosen = rng.permutation(eligible)[:needed]
    targets: dict[str, np.ndarray] = {}
    pos = 0
    for name in INVOICE_FAULT_ROLES:
        targets[name] = np.sort(chosen[pos : pos + counts[name]])
        pos += counts[name]
        role[targets[name]] = INVOICE_FAULT_ROLES[name]
    refund_t = targets["refund_not_posted"]
    cn_variant = rng.random(len(refund_t)) < 0.3
    role[refund_t[cn_variant]] = F_CN_UNPOSTED
    # delayed: half still unposted at as_of (historical estates only): move them just before as_of
    delayed = targets["erp_posting_delayed"]
    unposted = np.zeros(len(delayed), dtype=bool)
    if t.stale_window[1] > 0 and len(delayed):
        unposted = rng.random(len(delayed)) < 0.5
        back = rng.integers(t.stale_window[0], t.stale_window[1] + 1, int(unposted.sum()))
        finalized[delayed[unposted]] = as_of - back
        issued[delayed[unposted]] = finalized[delayed[unposted]] - t.finalize_lag[0]
        due[delayed[unposted]] = issued[delayed[unposted]] + 30 * DAY
    # rejected: issue date backdated into the closed period (the month before start)
    rejected = targets["erp_business_rejection"]
    close_edge = first_of_month_ms(cfg.start_ms)
    issued[rejected] = close_edge - rng.integers(3_600_000, 3 * DAY, len(rejected))
    due[rejected] = issued[rejected] + 30 * DAY
    period_msgs = [f"period {ms_to_dt(int(x)):%Y-%m} is closed" for x in issued[rejected]]
    dup_webhook = role == F_DUP_WEBHOOK

    # ---- billing payments by slot
    p_exists = np.zeros((4, n), dtype=bool)
    p_time = np.zeros((4, n), dtype=np.int64)
    p_amount = np.zeros((4, n), dtype=np.int64)
    p_method = np.zeros((4, n), dtype=np.int64)
    is_fault = role >= 10
    bank = (rng.random(n) < 0.3) & ~is_fault
    lag = np.where(bank, log_uniform(rng, t.bank_lag, n), log_uniform(rng, t.card_lag, n))
    # slot 3 first where it precedes payment (credit notes)
    credit = (role == R_CREDIT_PAID) | (role == F_CN_UNPOSTED)
    cn_amount = np.maximum(SCALE[currency], np.round(total * rng.uniform(0.05, 0.3, n)).astype(np.int64))
    cn_amount = np.minimum(cn_amount, total - 1)
    # failed attempt
    failed = role == R_FAILED_PAID
    p_exists[0] = failed
    p_time[0] = finalized + lag
    p_amount[0] = total
    p_method[0] = 0
    # first payment
    full_roles = (R_PAID, R_REFUND, R_FAILED_PAID, F_UNAPPLIED, F_STATUS, F_REFUND_UNPOSTED, F_DUP_WEBHOOK)
    pays_full = np.isin(role, full_roles)
    partial = np.isin(role, (R_PARTIAL_OPEN, R_PARTIAL_FULL, F_UNDER))
    t1 = finalized + lag
    t1 = np.where(failed, p_time[0] + log_uniform(rng, t.retry_lag, n), t1)
    credit_time = finalized + log_uniform(rng, t.credit_lag, n)
    t1 = np.where(role == R_CREDIT_PAID, credit_time + lag, t1)
    partial_amount = np.round(total * rng.uniform(0.2, 0.8, n)).astype(np.int64)
    amount1 = np.where(partial, partial_amount, np.where(role == R_CREDIT_PAID, total - cn_amount, total))
    # multi-invoice groups: the leader's bank payment settles the whole group after its last invoice
    group_end = np.full(n, -1, dtype=np.int64)
    group_end[leaders] = leaders + size - 1
    group_total = np.zeros(n, dtype=np.int64)
    np.add.at(group_total, leaders, total[leaders])
    np.add.at(group_total, follow_leader, total[followers])
    lead_t = finalized[group_end[leaders]] + log_uniform(rng, t.bank_lag, len(leaders))
    t1[leaders] = lead_t
    amount1[leaders] = group_total[leaders]
    p_method[1] = np.where(bank, 1, 0)
    p_method[1][leaders] = 1
    p_exists[1] = pays_full | partial | (role == R_CREDIT_PAID) | (role == R_MULTI_LEAD)
    p_time[1] = t1
    p_amount[1] = amount1
    # second payment settles the rest of a two-part payment
    p_exists[2] = role == R_PARTIAL_FULL
    p_time[2] = t1 + log_uniform(rng, t.bank_lag, n)
    p_amount[2] = total - partial_amount
    p_method[2] = 1
    # slot 3: refunds after the first payment, credit notes before it
    refund = (role == R_REFUND) | (role == F_REFUND_UNPOSTED)
    refund_amount = np.where(
        rng.random(n) < 0.3, total, np.maximum(1, np.round(total * rng.uniform(0.1, 0.9, n)).astype(np.int64))
    )
    p_exists[3] = refund | credit
    p_time[3] = np.where(credit, credit_time, t1 + log_uniform(rng, t.refund_lag, n))
    p_amount[3] = np.where(credit, cn_amount, refund_amount)
    p_method[3] = p_method[1]
    # what has happened by the cutoff (clean changes only; fault rows are old enough by construction)
    p_exists &= p_time <= cutoff
    # allocations of slot-1 payments
    payer = np.where(p_exists[1], np.arange(n), -1)
    payer[followers] = np.where(p_exists[1][follow_leader], follow_leader, -1)
    alloc1 = np.where(payer >= 0, np.where(role == R_MULTI_FOLLOW, total, amount1), 0)
    alloc1[leaders] = np.where(payer[leaders] >= 0, total[leaders], 0)
    settle1_t = np.where(payer >= 0, p_time[1][np.maximum(payer, 0)], 0)
    amount_paid = alloc1 + np.where(p_exists[2], p_amount[2], 0)
    amount_credited = np.where(p_exists[3] & credit, p_amount[3], 0)
    paid = amount_paid + amount_credited == total
    settle_t = np.maximum(settle1_t, np.where(p_exists[2], p_time[2], 0))
    settle_t = np.maximum(settle_t, np.where(p_exists[3] & credit, p_time[3], 0))
    paid_at = np.where(paid, settle_t, 0)
    updated = np.maximum(finalized, settle_t)

    # ---- ERP postings by slot
    e_exists = np.zeros((5, n), dtype=bool)
    e_posted = np.zeros((5, n), dtype=np.int64)
    e_amount = np.zeros((5, n), dtype=np.int64)
    inv_post = finalized + log_uniform(rng, t.erp_latency, n)
    inv_post = outages.shift(inv_post, rng, t.erp_latency)
    delay = log_uniform(rng, t.erp_delay, n)
    inv_post[delayed] = finalized[delayed] + delay[delayed]
    e_exists[0] = (role != F_MISSING) & (inv_post <= as_of)
    e_exists[0][delayed[unposted]] = False
    e_posted[0] = inv_post
    e_amount[0] = total
    e_currency = currency.copy()
    # amount mismatch variants: rounding (to tens of major units), fx (stale rate), tax (booked net)
    amt = targets["amount_mismatch"]
    variant = rng.integers(0, 3, len(amt))
    mind = _min_diff(total[amt], currency[amt])
    tens = 10 * SCALE[currency[amt]]
    rounding = -(-(total[amt] + mind) // tens) * tens - total[amt]
    sign = np.where(rng.random(len(amt)) < 0.5, -1, 1)
    fx = sign * np.maximum(mind, np.round(total[amt] * rng.uniform(0.05, 0.12, len(amt))).astype(np.int64))
    tax_ok = tax[amt] >= mind
    variant = np.where((variant == 2) & ~tax_ok, 1, variant)
    diff = np.select([variant == 0, variant == 1], [rounding, fx], -tax[amt])
    e_amount[0][amt] = total[amt] + diff
    cur_t = targets["currency_mismatch"]
    e_currency[cur_t] = (currency[cur_t] + 1 + rng.integers(0, len(CURRENCIES) - 1, len(cur_t))) % len(CURRENCIES)
    # duplicate posting
    dup = targets["duplicate_erp_posting"]
    e_exists[1][dup] = True
    e_posted[1][dup] = e_posted[0][dup] + log_uniform(rng, (t.erp_latency[1], 3 * t.erp_latency[1]), len(dup))
    e_amount[1][dup] = total[dup]
    # applications: after the payment and after the invoice is posted in the ERP
    app1 = settle1_t + log_uniform(rng, t.erp_latency, n)
    app1 = np.maximum(outages.shift(app1, rng, t.erp_latency), e_posted[0] + 1)
    e_exists[2] = (payer >= 0) & e_exists[0] & (role != F_UNAPPLIED) & (app1 <= as_of)
    e_posted[2] = app1
    e_amount[2] = alloc1
    under = targets["partial_payment_under_applied"]
    e_amount[2][under] = alloc1[under] - np.maximum(alloc1[under] // 2, 1)
    app2 = outages.shift(p_time[2] + log_uniform(rng, t.erp_latency, n), rng, t.erp_latency)
    app2 = np.maximum(app2, e_posted[0] + 1)
    e_exists[3] = p_exists[2] & e_exists[0] & (app2 <= as_of)
    e_posted[3] = app2
    e_amount[3] = p_amount[2]
    memo = outages.shift(p_time[3] + log_uniform(rng, t.erp_latency, n), rng, t.erp_latency)
    memo = np.maximum(memo, e_posted[0] + 1)
    e_exists[4] = p_exists[3] & e_exists[0] & ~np.isin(role, (F_REFUND_UNPOSTED, F_CN_UNPOSTED)) & (memo <= as_of)
    e_posted[4] = memo
    e_amount[4] = p_amount[3]
    # rejected postings stay as drafts
    e_status = np.zeros(n, dtype=np.int64)
    e_status[rejected] = 2
    e_exists[0][rejected] = True
    # the ERP invoice is paid once every settling posting is there
    settled = (
        paid
        & e_exists[0]
        & ((payer < 0) | e_exists[2])
        & (~p_exists[2] | e_exists[3])
        & (~(p_exists[3] & credit) | e_exists[4])
    )
    settled &= ~np.isin(role, (F_STATUS, F_UNAPPLIED))
    e_status[settled] = 1
    settle_post = np.maximum(
        np.where(e_exists[2], e_posted[2], 0),
        np.maximum(np.where(e_exists[3], e_posted[3], 0), np.where(e_exists[4] & credit, e_posted[4], 0)),
    )
    e_updated = np.where(settled, np.maximum(e_posted[0], settle_post), e_posted[0])

    # ---- orphan payments (their ids use slot 3 of a random invoice's payment id range: py_ prefix is free)
    no = counts["orphan_payment"]
    o_slot = np.sort(rng.choice(eligible, size=min(no, len(eligible)), replace=False)).astype(np.int64)
    o_cust = rng.integers(0, cust.n_billing, len(o_slot))
    o_time = issued[o_slot] + rng.integers(0, t.finalize_lag[1] + 1, len(o_slot))
    # in a currency the customer is never billed in: in its own, the amount could equal what one of its open
    # invoices owes, and the reconciler's N:1 match would rightly call it that invoice's unapplied payment
    o_currency = (cust.currency[o_cust] + rng.integers(1, len(CURRENCIES), len(o_slot))) % len(CURRENCIES)
    o_amount = np.round(rng.integers(20, 2_000, len(o_slot)) * FX[o_currency]).astype(np.int64) * SCALE[o_currency]

    chunk = Chunk(
        k,
        j,
        c,
        region,
        currency,
        subtotal,
        tax,
        total,
        usage,
        annual,
        issued,
        finalized,
        due,
        role,
        ctx_lost,
        dup_webhook,
        p_exists,
        p_time,
        p_amount,
        p_method,
        credit,
        payer,
        alloc1,
        amount_paid,
        amount_credited,
        paid,
        paid_at,
        updated,
        e_exists,
        e_posted,
        e_amount,
        e_currency,
        e_status,
        e_updated,
        period_msgs,
        o_slot,
        o_cust,
        o_time,
        o_amount,
        cust.region[o_cust],
        o_currency,
    )
    chunk.unmapped = cust.unmapped[c]
    chunk.faults = _chunk_faults(chunk, targets, unposted, variant, rejected, cn_variant)
    chunk.faults += _unmapped_party_faults(chunk, cust)
    return chunk


def _unmapped_party_faults(ch: Chunk, cust: Customers) -> list[InjectedFault]:
    """One fault per unmapped customer with an invoice posting (draft = rejected, not a posting) in this chunk;
    a customer with none leaves no trace to find. Chunks repeat a customer: ``Generated.manifest`` keeps one."""
    posted = ch.unmapped & ((ch.e_exists[0] & (ch.e_status != 2)) | ch.e_exists[1])
    spec = FAULTS["erp_party_unmapped"]
    return [
        InjectedFault(
            "erp_party_unmapped",
            spec.expected_class,
            {"customer_id": f"cus_{i:08d}"},
            spec.systems,
            REGIONS[int(cust.region[i])],
            ms_to_dt(int(cust.billing_created[i])),
        )
        for i in np.unique(ch.cust[posted]).tolist()
    ]


def payment_id(prefix: str, j: int, slot: int) -> str:
    return f"{prefix}{j * 4 + slot:011d}"


def ledger_id(j: int, slot: int) -> str:
    return f"le_{j:010d}{slot}"


def _chunk_faults(
    ch: Chunk,
    targets: dict[str, np.ndarray],
    unposted: np.ndarray,
    variant: np.ndarray,
    rejected: np.ndarray,
    cn_variant: np.ndarray,
) -> list[InjectedFault]:
    out: list[InjectedFault] = []

    region = ch.region.tolist()
    jj = ch.j.tolist()
    cc = ch.cust.tolist()

    def add(name: str, i: int, keys: dict[str, str], at_ms: int, expected: str | None = "", **detail: str) -> None:
        spec = FAULTS[name]
        cls = spec.expected_class if expected == "" else expected
        out.append(InjectedFault(name, cls, keys, spec.systems, REGIONS[region[i]], ms_to_dt(at_ms), detail))

    def inv(i: int) -> dict[str, str]:
        return {"invoice_id": f"in_{jj[i]:010d}", "customer_id": f"cus_{cc[i]:08d}"}

    for idx, i in enumerate(targets["erp_posting_delayed"].tolist()):
        if unposted[idx]:
            add("erp_posting_delayed", i, inv(i), ch.finalized[i], "stale_sync", variant="unposted")
        else:
            add(
                "erp_posting_delayed",
                i,
                {**inv(i), "ledger_entry_id": ledger_id(int(ch.j[i]), 0)},
                ch.finalized[i],
                None,
                variant="posted_late",
                posted_at=iso_ms(int(ch.e_posted[0][i])),
            )
    for i in targets["erp_posting_missing"].tolist():
        add("erp_posting_missing", i, inv(i), ch.finalized[i])
    for idx, i in enumerate(targets["amount_mismatch"].tolist()):
        add(
            "amount_mismatch",
            i,
            {**inv(i), "ledger_entry_id": ledger_id(int(ch.j[i]), 0)},
            ch.e_posted[0][i],
            variant=AMOUNT_VARIANTS[int(variant[idx])],
            billing_minor=str(int(ch.total[i])),
            erp_minor=str(int(ch.e_amount[0][i])),
        )
    for i in targets["currency_mismatch"].tolist():
        add(
            "currency_mismatch",
            i,
            {**inv(i), "ledger_entry_id": ledger_id(int(ch.j[i]), 0)},
            ch.e_posted[0][i],
            billing_currency=CURRENCIES[ch.currency[i]],
            erp_currency=CURRENCIES[ch.e_currency[i]],
        )
    for i in targets["duplicate_erp_posting"].tolist():
        add(
            "duplicate_erp_posting",
            i,
            {**inv(i), "ledger_entry_id": ledger_id(int(ch.j[i]), 1)},
            ch.e_posted[1][i],
            original_entry_id=ledger_id(int(ch.j[i]), 0),
        )
    for i in targets["payment_not_applied"].tolist():
        add("payment_not_applied", i, {**inv(i), "payment_id": payment_id("py_", int(ch.j[i]), 1)}, ch.p_time[1][i])
    for i in targets["status_mismatch"].tolist():
        add("status_mismatch", i, {**inv(i), "ledger_entry_id": ledger_id(int(ch.j[i]), 0)}, ch.e_posted[2][i])
    for i in targets["partial_payment_under_applied"].tolist():
        add(
            "partial_payment_under_applied",
            i,
            {**inv(i), "payment_id": payment_id("py_", int(ch.j[i]), 1), "ledger_entry_id": ledger_id(int(ch.j[i]), 2)},
            ch.e_posted[2][i],
            billing_minor=str(int(ch.alloc1[i])),
            erp_minor=str(int(ch.e_amount[2][i])),
        )
    for idx, i in enumerate(targets["refund_not_posted"].tolist()):
        prefix = "cn_" if cn_variant[idx] else "re_"
        add(
            "refund_not_posted",
            i,
            {**inv(i), "payment_id": payment_id(prefix, int(ch.j[i]), 3)},
            ch.p_time[3][i],
            variant="credit_note" if cn_variant[idx] else "refund",
        )
    for i in targets["duplicate_webhook"].tolist():
        add("duplicate_webhook", i, inv(i), ch.updated[i])
    for idx, i in enumerate(rejected.tolist()):
        add(
            "erp_business_rejection",
            i,
            {**inv(i), "ledger_entry_id": ledger_id(int(ch.j[i]), 0)},
            ch.e_posted[0][i],
            reason="erp_rejected",
            message=ch.period_closed_msg[idx],
        )
    spec = FAULTS["orphan_payment"]
    for x, i in enumerate(ch.o_slot.tolist()):
        out.append(
            InjectedFault(
                "orphan_payment",
                spec.expected_class,
                {"payment_id": payment_id("py_", int(ch.j[i]), 3), "customer_id": f"cus_{ch.o_cust[x]:08d}"},
                spec.systems,
                REGIONS[int(ch.o_region[x])],
                ms_to_dt(int(ch.o_time[x])),
                {"method": "bank_transfer", "amount_minor": str(int(ch.o_amount[x]))},
            )
        )
    return out
