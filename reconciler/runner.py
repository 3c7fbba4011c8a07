"""One reconciliation run: pull -> scope -> compare (SQL) -> classify (pure) -> queue -> statement.

The run's stages report progress through a callback (the CLI's progress bar reads it through the API).
Money never leaves Int64 minor units; time comparisons use the run's ``as_of`` (default: now), so a seeded
estate "as of" a past date reconciles exactly as it would have then.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from connectors.base import BillingConnector, ErpConnector, TransientError
from reconciler import classify as c
from tower_core.store import Store
from tower_core.store import reconcile as q

log = logging.getLogger("tower.reconciler")

STAGES = ("pull", "scope", "compare_payments", "compare_invoices", "compare_customers", "queue", "statement")
# Incremental scopes start a little before the last run's start: rows ingested while it read are compared again.
WATERMARK_OVERLAP = dt.timedelta(seconds=5)
PAGE_SIZE = 1000

ProgressFn = Callable[[str, int, int], None]


class RunFailed(Exception):
    """The run could not complete (a source unreachable, the store failing): nothing was half-classified."""


@dataclass
class RunResult:
    run_id: str
    mode: str
    region: str
    as_of: dt.datetime
    pulled: dict[str, int] = field(default_factory=dict)
    keys_compared: int = 0
    findings: int = 0
    new: int = 0
    resolved: int = 0
    open: int = 0
    residual_minor: int = 0
    statement_rows: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pull_stream(
    store: Store,
    connector_name: str,
    stream: str,
    fetch: Callable[[str | None, int], Any],
    write: Callable[[Store, list[Any], str | None], int],
) -> int:
    """Drain one cursor-based stream into its state table; the cursor advances only after the rows landed."""
    total = 0
    cursor = q.get_cursor(store, connector_name, stream)
    retry = Retrying(
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.2, max=2),
        retry=retry_if_exception_type(TransientError),
        reraise=True,
    )
    while True:
        page = retry(fetch, cursor, PAGE_SIZE)
        if page.items:
            write(store, list(page.items), None)
            total += len(page.items)
        if page.next_cursor and page.next_cursor != cursor:
            q.set_cursor(store, connector_name, stream, page.next_cursor)
            cursor = page.next_cursor
        if page.done or not page.items:
            return total


def pull(store: Store, billing: BillingConnector | None, erp: ErpConnector | None) -> dict[str, int]:
    """Everything changed since the stored cursors, from every configured connector."""
    pulled: dict[str, int] = {}
    try:
        if billing is not None:
            pulled["invoices"] = _pull_stream(store, billing.name, "invoices", billing.pull_invoices, q.write_invoices)
            pulled["payments"] = _pull_stream(store, billing.name, "payments", billing.pull_payments, q.write_payments)
            if hasattr(billing, "pull_customers") and q.table_exists(store, "billing_customers"):
                pulled["customers"] = _pull_stream(
                    store, billing.name, "customers", billing.pull_customers, q.write_customers
                )
        if erp is not None:
            pulled["ledger_entries"] = _pull_stream(
                store, erp.name, "ledger_entries", erp.pull_ledger_entries, q.write_ledger
            )
    except TransientError as exc:
        raise RunFailed(f"pull failed: {exc}") from exc
    return pulled


def pull_cdp(store: Store, cdp: Any) -> int:
    if cdp is None or not hasattr(cdp, "pull_profiles") or not q.table_exists(store, "cdp_profiles"):
        return 0
    try:
        return _pull_stream(store, getattr(cdp, "name", "cdp"), "profiles", cdp.pull_profiles, q.write_profiles)
    except TransientError as exc:
        raise RunFailed(f"CDP pull failed: {exc}") from exc


def _finding_row(run_id: str, f: c.Finding, key_type: str) -> dict[str, Any]:
    return {
        "RunId": run_id,
        "DriftId": f.drift_id,
        "Class": f.cls,
        "ReasonCode": f.reason,
        "System": f.system,
        "Region": f.region,
        "Currency": f.currency,
        "CustomerId": f.customer_id,
        "InvoiceId": f.invoice_id if key_type == "invoice" else "",
        "PaymentId": f.payment_id if key_type == "payment" else "",
        "LedgerEntryId": f.ledger_entry_id,
        "PrimaryKey": f.primary_key,
        "KeyType": key_type,
        "AmountMinor": f.amount_minor,
        "BillingValues": f.billing,
        "ErpValues": f.erp,
        "DiffFields": f.diff_fields,
        "Day": f.day,
    }


def _fact_row(run_id: str, r: dict[str, Any], finding: c.Finding | None) -> dict[str, Any]:
    """A candidate invoice key's contribution to the statement cells, and the bucket explaining it."""
    billing = int(r["b_total"] or 0) if r["b_n"] and r["b_status"] in q.FINAL_STATUSES else 0
    erp = int(r["e_sum"] or 0) if r["e_n"] else 0
    b_day = r["b_day"] or r["e_day"]
    e_day = r["e_day"] or r["b_day"]
    b_cell = (r["b_region"] or r["e_region"], r["b_currency"] or r["e_currency"])
    e_cell = (r["e_region"] or r["b_region"], r["e_currency"] or r["b_currency"])
    if finding is not None:
        bucket = finding.cls
    elif billing != erp:
        bucket = c.TOLERANCE
    elif b_cell == e_cell and b_day != e_day and billing:
        bucket = "timing"  # posted into another period; amounts agree
    else:
        bucket = ""
    return {
        "Key": r["key"],
        "BillingRegion": b_cell[0],
        "BillingCurrency": b_cell[1],
        "ErpRegion": e_cell[0],
        "ErpCurrency": e_cell[1],
        "BillingDay": b_day,
        "ErpDay": e_day,
        "BillingMinor": billing,
        "ErpMinor": erp,
        "Class": bucket,
        "RunId": run_id,
    }


def _item_row(finding: dict[str, Any], existing: dict[str, Any] | None, run_id: str, as_of: dt.datetime) -> dict:
    prev = existing["State"] if existing else None
    state = c.run_transition(prev, True)
    reopened = prev in (None, c.RESOLVED)
    row = {k: v for k, v in finding.items() if k != "RunId"}
    row.update(
        {
            "State": state,
            "StateNote": "" if reopened else existing["StateNote"],  # type: ignore[index]
            "FirstSeen": as_of if reopened else existing["FirstSeen"],  # type: ignore[index]
            "LastSeen": as_of,
            "UpdatedAt": _now(),
            "RunId": run_id,
            "ResolvedAt": q.EPOCH,
        }
    )
    return row


def _audit_view(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"state": row["State"], "class": row["Class"], "reason": row["ReasonCode"], "amount": row["AmountMinor"]}


class Reconciler:
    """Runs reconciliations on one store with the configured connectors and rules."""

    def __init__(
        self,
        store: Store,
        rules: c.Rules,
        billing: BillingConnector | None = None,
        erp: ErpConnector | None = None,
        cdp: Any = None,
        queue_lock: Any = None,
    ) -> None:
        self.queue_lock = queue_lock or threading.RLock()
        self.store = store
        self.rules = rules
        self.billing = billing
        self.erp = erp
        self.cdp = cdp

    def run(
        self,
        *,
        full: bool = False,
        region: str = "",
        as_of: dt.datetime | None = None,
        trigger: str = "api",
        requested_by: str = "",
        run_id: str | None = None,
        progress: ProgressFn | None = None,
        pull_sources: bool = True,
    ) -> RunResult:
        store = self.store
        run_id = run_id or uuid.uuid4().hex[:16]
        as_of = as_of or _now()
        started = _now()
        watermark = None if full else q.last_watermark(store, region)
        mode = "full" if full or watermark is None else "incremental"
        result = RunResult(run_id, mode, region, as_of)
        record: dict[str, Any] = {
            "RunId": run_id,
            "Mode": mode,
            "Region": region,
            "Trigger": trigger,
            "RequestedBy": requested_by,
            "State": "running",
            "Stage": STAGES[0],
            "AsOf": as_of,
            "Watermark": (watermark - WATERMARK_OVERLAP) if watermark else q.EPOCH,
            "StartedAt": started,
            "FinishedAt": q.EPOCH,
            "Pulled": {},
            "KeysCompared": 0,
            "DriftOpen": 0,
            "DriftNew": 0,
            "DriftResolved": 0,
            "ResidualMinor": 0,
            "Error": "",
        }
        q.write_run(store, record)

        def stage(name: str) -> None:
            record["Stage"] = name
            if progress:
                progress(name, STAGES.index(name), len(STAGES))

        try:
            t0 = time.perf_counter()
            stage("pull")
            if pull_sources:
                result.pulled = pull(store, self.billing, self.erp)
                n = pull_cdp(store, self.cdp)
                if n:
                    result.pulled["profiles"] = n
            record["Pulled"] = result.pulled
            result.timings["pull"] = time.perf_counter() - t0
            self._compare(result, record, full=mode == "full", stage=stage)
            record["State"] = "succeeded"
        except Exception as exc:
            record["State"] = "failed"
            record["Error"] = str(exc)[:2000]
            record["FinishedAt"] = _now()
            q.write_run(store, record)
            if isinstance(exc, RunFailed):
                raise
            raise RunFailed(str(exc)) from exc
        finally:
            try:
                q.drop_scope(store, run_id)
            except Exception:  # scratch rows also expire by TTL
                log.debug("scope cleanup failed", exc_info=True)
        record["FinishedAt"] = _now()
        record.update(
            {
                "KeysCompared": result.keys_compared,
                "DriftOpen": result.open,
                "DriftNew": result.new,
                "DriftResolved": result.resolved,
                "ResidualMinor": result.residual_minor,
                "Stage": "done",
            }
        )
        q.write_run(store, record)
        if progress:
            progress("done", len(STAGES), len(STAGES))
        return result

    # --- comparison
    def _compare(self, result: RunResult, record: dict[str, Any], *, full: bool, stage: Callable[[str], None]) -> None:
        store, rules, run_id, region, as_of = self.store, self.rules, result.run_id, result.region, result.as_of
        customers = q.table_exists(store, "cdp_profiles") and q.table_exists(store, "billing_customers")
        t = time.perf_counter()
        stage("scope")
        if not full:
            wm = record["Watermark"]
            sizes = q.build_scope(store, run_id, wm, customers)
            result.keys_compared = sum(sizes.values())
        result.timings["scope"] = time.perf_counter() - t

        findings: list[dict[str, Any]] = []
        facts: list[dict[str, Any]] = []

        t = time.perf_counter()
        stage("compare_payments")
        pay = q.payment_candidates(store, run_id, full=full, region=region).to_pylist()
        unallocated = [
            {
                "payment_id": r["key"],
                "customer_id": r["p_customer"],
                "amount_minor": r["p_amount"],
                "occurred_at": r["p_occurred"],
                "currency": r["p_currency"],
            }
            for r in pay
            if r["p_n"] and r["p_kind"] == "payment" and r["p_status"] == "succeeded" and not r["p_alloc_n"]
            and not r["e_applied_n"]
        ]  # fmt: skip
        tolerances = {cur: (t_.abs_minor, t_.rel_bp) for cur, t_ in rules.tolerances.items()}
        tolerances["*"] = (rules.default_tolerance.abs_minor, rules.default_tolerance.rel_bp)
        matched = q.sum_matches(store, unallocated, rules.match_window_days, tolerances)
        for r in pay:
            r["sum_match"] = r["key"] in matched
            f = c.classify_payment(r, rules, as_of)
            if f is not None:
                findings.append(_finding_row(run_id, f, "payment"))
        result.timings["compare_payments"] = time.perf_counter() - t

        t = time.perf_counter()
        stage("compare_invoices")
        inv = q.invoice_candidates(store, run_id, full=full, region=region).to_pylist()
        for r in inv:
            f = c.classify_invoice(r, rules, as_of)
            if f is not None:
                findings.append(_finding_row(run_id, f, "invoice"))
            facts.append(_fact_row(run_id, r, f))
        result.timings["compare_invoices"] = time.perf_counter() - t

        t = time.perf_counter()
        stage("compare_customers")
        if customers:
            for r in q.customer_candidates(store, run_id, full=full, region=region).to_pylist():
                f = c.classify_customer(r, rules, as_of)
                if f is not None:
                    findings.append(_finding_row(run_id, f, "customer"))
        result.timings["compare_customers"] = time.perf_counter() - t

        t = time.perf_counter()
        stage("queue")
        result.findings = len(findings)
        with self.queue_lock:
            self._merge_queue(result, findings, full=full, customers=customers)
        result.timings["queue"] = time.perf_counter() - t

        t = time.perf_counter()
        stage("statement")
        q.write_facts(store, facts)
        q.clear_facts(store, run_id, full=full, region=region)
        result.statement_rows = q.write_statement(store, run_id, region)
        result.residual_minor = q.statement_residual(store, run_id)
        result.timings["statement"] = time.perf_counter() - t
        result.open = sum(q.open_counts(store).values())

    def _merge_queue(self, result: RunResult, findings: list[dict[str, Any]], *, full: bool, customers: bool) -> None:
        """New/persisting items from the findings; resolved ones for compared keys no longer drifting."""
        store, run_id, as_of = self.store, result.run_id, result.as_of
        by_id: dict[str, dict[str, Any]] = {}
        for f in findings:
            by_id.setdefault(f["DriftId"], f)  # one item per (class, primary key)
        findings = list(by_id.values())
        q.write_findings(store, findings)
        existing = q.existing_items(store, run_id=run_id) if findings else {}
        rows, audit = [], []
        now = _now()
        for f in findings:
            prev = existing.get(f["DriftId"])
            row = _item_row(f, prev, run_id, as_of)
            rows.append(row)
            if prev is None or prev["State"] != row["State"]:
                result.new += row["State"] == c.NEW
                audit.append(
                    q.audit_record(
                        "reconciler",
                        f"drift.{row['State']}",
                        "drift_item",
                        row["DriftId"],
                        _audit_view(prev),
                        _audit_view(row),
                        f"run {run_id}: {row['ReasonCode']}",
                        at=now,
                    )
                )
        resolve = q.items_to_resolve(store, run_id, full=full, region=result.region, customers=customers)
        for prev in resolve:
            row = dict(prev)
            row.update({"State": c.RESOLVED, "UpdatedAt": now, "ResolvedAt": as_of, "RunId": run_id})
            rows.append(row)
            audit.append(
                q.audit_record(
                    "reconciler",
                    "drift.resolved",
                    "drift_item",
                    row["DriftId"],
                    _audit_view(prev),
                    _audit_view(row),
                    f"run {run_id}: drift gone",
                    at=now,
                )
            )
        result.resolved = len(resolve)
        for chunk in _chunks(rows, 50_000):
            q.write_items(store, chunk)
        for chunk in _chunks(audit, 50_000):
            q.write_audit(store, chunk)


def _chunks(rows: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(rows), n):
        yield rows[i : i + n]
