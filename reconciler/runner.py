"""One reconciliation run: pull -> scope -> compare (SQL) -> classify (pure) -> queue -> statement.

The run's stages report progress through a callback (the CLI's progress bar reads it through the API).
Money never leaves Int64 minor units; time comparisons use the run's ``as_of`` (default: now), so a seeded
estate "as of" a past date reconciles exactly as it would have then.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from connectors.base import BillingConnector, ConnectorError, ErpConnector, TransientError
from connectors.segment.tracking import PiiPolicy
from reconciler import classify as c
from reconciler import run_owner
from reconciler.retention import DROP_AT_LEAST, StatementRetention, StatementRun, statements_to_drop
from reconciler.sla.ledger_activity import ERP, activity_of
from tower_core.errors import StoreError, one_line
from tower_core.models import CURRENCY_EXPONENT, record_ref
from tower_core.store import Store
from tower_core.store import reconcile as q
from tower_core.store import sla as sla_q
from tower_core.store import source_skips as skips

log = logging.getLogger("tower.reconciler")

STAGES = ("pull", "candidates", "facts", "classify", "queue", "statement")
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
) -> tuple[int, int]:
    """Drain one cursor-based stream into its state table; the cursor advances only after the rows landed.
    Records the connector could not map are kept in ``source_skips`` (and the pull goes on); a skipped record
    that maps on a later pull is cleared. Returns (records stored, records skipped)."""
    total = skipped = 0
    cursor = q.get_cursor(store, connector_name, stream)
    retry = Retrying(
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.2, max=2),
        retry=retry_if_exception_type(TransientError),
        reraise=True,
    )
    open_skips = skips.open_skip_count(store, connector_name, stream) > 0
    while True:
        page = retry(fetch, cursor, PAGE_SIZE)
        if page.items:
            write(store, list(page.items), None)
            total += len(page.items)
            if open_skips:
                skips.clear_skips(store, connector_name, stream, [record_ref(type(i), i) for i in page.items])
        if page.skipped:
            skips.record_skips(store, connector_name, stream, page.skipped)
            skipped += len(page.skipped)
            open_skips = True
            for s in page.skipped:
                log.warning("%s %s: skipped %s: %s", connector_name, stream, s.ref, s.reason)
        if page.next_cursor and page.next_cursor != cursor:
            q.set_cursor(store, connector_name, stream, page.next_cursor)
            cursor = page.next_cursor
        if page.done or not (page.items or page.skipped):
            return total, skipped


def pull(
    store: Store, billing: BillingConnector | None, erp: ErpConnector | None, pii: PiiPolicy | None = None
) -> dict[str, int]:
    """Everything changed since the stored cursors, from every configured connector: records stored per
    stream, and ``<stream>_skipped`` for records that could not be mapped (listed by GET /api/sources/skipped)."""
    pulled: dict[str, int] = {}

    def drain(name: str, stream: str, fetch: Callable[[str | None, int], Any], write: Any) -> None:
        pulled[stream], n_skipped = _pull_stream(store, name, stream, fetch, write)
        if n_skipped:
            pulled[f"{stream}_skipped"] = n_skipped

    def write_customers(st: Store, items: list[Any], token: str | None) -> int:
        return q.write_customers(st, [scrub_customer(c, pii) for c in items], token)

    def write_ledger(st: Store, items: list[Any], token: str | None) -> int:
        written = q.write_ledger(st, items, token)
        # what the SLA learns of the ERP from its records (reconciler/sla/ledger_activity.py)
        sla_q.write_step_activity(st, ERP, [a for a in map(activity_of, items) if a is not None])
        return written

    try:
        if billing is not None:
            drain(billing.name, "invoices", billing.pull_invoices, q.write_invoices)
            drain(billing.name, "payments", billing.pull_payments, q.write_payments)
            if hasattr(billing, "pull_customers") and q.table_exists(store, "billing_customers"):
                drain(billing.name, "customers", billing.pull_customers, write_customers)
        if erp is not None:
            drain(erp.name, "ledger_entries", erp.pull_ledger_entries, write_ledger)
    except TransientError as exc:
        raise RunFailed(f"pull failed: {exc}") from exc
    return pulled


def _code_digest() -> str:
    """The text of the modules that decide what a comparison finds (its SQL and the pure rules): a release that
    changed them classifies some unchanged keys differently."""
    digest = hashlib.sha256()
    for module in (q, c):
        try:
            digest.update(Path(module.__file__ or "").read_bytes())
        except OSError:  # not installed as files (a zip): the module's name stands in, and settings still count
            digest.update(module.__name__.encode())
    return digest.hexdigest()


_CODE_DIGEST = _code_digest()


def rules_fingerprint(params: dict[str, Any]) -> str:
    """What an incremental run's results depend on besides the data: the comparison code and the rules' settings
    (tolerances, grace periods, match window; not the run's as_of). Runs are compared with the last run of the
    same fingerprint (q.last_watermark): after an upgrade or a change of settings, the first run is a full one."""
    settings = json.dumps({k: v for k, v in params.items() if k != "as_of"}, sort_keys=True, default=str)
    return hashlib.sha256(f"{_CODE_DIGEST}\n{settings}".encode()).hexdigest()[:16]


def unknown_region(region: str, regions: list[str]) -> str:
    return f"no data names region {region!r} (regions are case-sensitive): {', '.join(regions[:20]) or 'none yet'}"


def _pseudonym(value: str, policy: PiiPolicy | None) -> str:
    return policy.digest(value) if policy is not None and policy.mode == "hash" and value else ""


def _error_line(exc: Exception) -> str:
    """The run's recorded error. The tower's own errors say what failed; anything else (a bug, a remote's answer
    no connector expected) was a bare ``'data'``: it is named by its type, and its traceback is logged."""
    if isinstance(exc, (RunFailed, ConnectorError, StoreError)):
        return one_line(str(exc), 2000)  # whatever a remote put in its answer (a proxy's HTML page)
    log.error("reconcile run failed on an unexpected error", exc_info=exc)
    return f"unexpected {type(exc).__name__}: {exc}"


def _user_id(value: str, policy: PiiPolicy | None) -> str:
    """A CDP user id stays (a join key) unless it may be an e-mail address: then the pseudonym the CDP's events
    carry for it (``PiiPolicy.identifier``), or nothing without a policy."""
    if "@" not in value:
        return value
    return policy.identifier(value) if policy is not None else ""


def scrub_profile(profile: Any, policy: PiiPolicy | None) -> Any:
    """CDP PII (name, e-mail, PII traits) is hashed with the keyed HMAC, or dropped without a policy, before
    a profile reaches the store; ids stay (they are the join keys)."""
    traits = policy.scrub(profile.traits) if policy is not None else {}
    name, email = _pseudonym(profile.name, policy), _pseudonym(profile.email, policy)
    user = _user_id(profile.cdp_user_id, policy)
    return dataclasses.replace(profile, name=name, email=email, traits=traits, cdp_user_id=user)


def scrub_customer(customer: Any, policy: PiiPolicy | None) -> Any:
    """A billing customer's name and e-mail, the same way: the reconciler compares ids, never reads them."""
    name, email = _pseudonym(customer.name, policy), _pseudonym(customer.email, policy)
    user = _user_id(customer.cdp_user_id, policy)
    return dataclasses.replace(customer, name=name, email=email, cdp_user_id=user)


def pull_cdp(store: Store, cdp: Any, pii: PiiPolicy | None = None) -> int:
    if cdp is None or not hasattr(cdp, "pull_profiles") or not q.table_exists(store, "cdp_profiles"):
        return 0

    def write(st: Store, items: list[Any], token: str | None) -> int:
        return q.write_profiles(st, [scrub_profile(p, pii) for p in items], token)

    try:
        return _pull_stream(store, getattr(cdp, "name", "cdp"), "profiles", cdp.pull_profiles, write)[0]
    except TransientError as exc:
        raise RunFailed(f"CDP pull failed: {exc}") from exc


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
        pii: PiiPolicy | None = None,
        retention: StatementRetention = StatementRetention(),
    ) -> None:
        self.pii = pii
        self.retention = retention
        self.queue_lock = queue_lock or threading.RLock()
        self.store = store
        self.rules = rules
        self.billing = billing
        self.erp = erp
        self.cdp = cdp
        # failed runs whose record the store refused (out of disk): written at the next run's start
        self._unrecorded: dict[str, dict[str, Any]] = {}
        # a graceful stop of the process: checked before each stage, which then does not start
        self.should_stop: Callable[[], bool] = lambda: False

    def _record_failure(self, record: dict[str, Any]) -> None:
        """Store a failed run's record; a store that refuses it now (the failure may be its own) gets it again
        at the next run, so the run never stays 'running' for good."""
        try:
            q.write_run(self.store, record)
            self._unrecorded.pop(record["RunId"], None)
        except StoreError as exc:
            self._unrecorded[record["RunId"]] = dict(record)
            log.error("run %s failed and its record could not be stored (retried next run): %s", record["RunId"], exc)

    def _store_clock_offset(self) -> dt.timedelta:
        """The store's clock minus this process's (a ClickHouse server on another host may differ by minutes); 0
        when the store does not answer (the run then fails at its first write, and says so)."""
        try:
            before = _now()
            theirs = q.store_now(self.store)
            after = _now()
        except StoreError:
            return dt.timedelta(0)
        return theirs - (before + (after - before) / 2)

    def _prune_statements(self) -> None:
        """Drop the statements the retention policy no longer keeps. A failure costs disk, not the run: the next
        run tries again."""
        try:
            runs = [StatementRun(r["run_id"], r["region"], r["created_at"]) for r in q.statement_runs(self.store)]
            drop = statements_to_drop(runs, _now(), self.retention)
            if len(drop) >= DROP_AT_LEAST:
                q.drop_statements(self.store, drop)
        except StoreError as exc:
            log.warning("could not prune old reconciliation statements (kept for the next run): %s", exc)

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
        # on the store's clock: the next incremental run compares the rows whose IngestedAt (the store's now at
        # insert) is past this start, so a tower clock ahead of a ClickHouse server's skipped the rows written
        # just after a run, for good (until a full run)
        offset = self._store_clock_offset()
        started = _now() + offset
        rules = rules_fingerprint(self.rule_params(as_of))
        watermark = None if full else q.last_watermark(store, region, rules)
        mode = "full" if full or watermark is None else "incremental"
        if mode == "full" and not full:
            log.info("run %s compares every key: no run under these rules (release and settings) covers %s yet",
                     run_id, f"region {region}" if region else "every region")  # fmt: skip
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
            "Owner": run_owner.this_process(),
            "Rules": rules,
        }
        for unrecorded in list(self._unrecorded.values()):
            self._record_failure(unrecorded)

        def stage(name: str) -> None:
            if self.should_stop():
                raise RunFailed(f"stopped before its {name} stage: the process is shutting down (the next run "
                                "compares these keys again)")  # fmt: skip
            record["Stage"] = name
            if name != STAGES[0]:  # stored as it goes: a run the process loses says where it stopped (not "pull")
                q.write_run(store, record)
            if progress:
                progress(name, STAGES.index(name), len(STAGES))

        try:
            q.write_run(store, record)
            t0 = time.perf_counter()
            stage("pull")
            if pull_sources:
                result.pulled = pull(store, self.billing, self.erp, self.pii)
                n = pull_cdp(store, self.cdp, self.pii)
                if n:
                    result.pulled["profiles"] = n
            record["Pulled"] = result.pulled
            result.timings["pull"] = time.perf_counter() - t0
            if region and region not in (regions := q.regions_with_data(store)):
                # it would compare nothing, and its empty statement would read as a clean reconciliation
                raise RunFailed(unknown_region(region, regions))
            self._compare(result, record, full=mode == "full", stage=stage)
            record["State"] = "succeeded"
        except Exception as exc:
            record["State"] = "failed"
            record["Error"] = _error_line(exc)[:2000]
            record["FinishedAt"] = _now() + offset
            self._record_failure(record)
            if isinstance(exc, RunFailed):
                raise
            raise RunFailed(record["Error"]) from exc
        record["FinishedAt"] = _now() + offset
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
    def rule_params(self, as_of: dt.datetime) -> dict[str, Any]:
        """The rules as query parameters of the SQL classification."""
        r = self.rules
        return {
            "as_of": as_of,
            "tol_abs": {cur: t.abs_minor for cur, t in r.tolerances.items()},
            "tol_abs_default": r.default_tolerance.abs_minor,
            "tol_rel": {cur: t.rel_bp for cur, t in r.tolerances.items()},
            "tol_rel_default": r.default_tolerance.rel_bp,
            "grace": {k: int(v) for k, v in r.grace_s.items() if k != "*"},
            "grace_default": r.default_grace_s,
            "exp": dict(CURRENCY_EXPONENT),
            "window": r.match_window_days,
        }

    def _compare(self, result: RunResult, record: dict[str, Any], *, full: bool, stage: Callable[[str], None]) -> None:
        store, run_id, region, as_of = self.store, result.run_id, result.region, result.as_of
        customers = q.table_exists(store, "cdp_profiles") and q.table_exists(store, "billing_customers")
        rules = self.rule_params(as_of)

        t = time.perf_counter()
        stage("candidates")
        if full:
            sizes = q.find_candidates(store, run_id, region)  # keys whose sides do not match exactly
        else:
            sizes = q.build_scope(store, run_id, record["Watermark"], customers)  # keys changed since the last run
            result.keys_compared = sum(sizes.values())
        result.timings["candidates"] = time.perf_counter() - t

        t = time.perf_counter()
        stage("facts")
        facts = q.collect_facts(store, run_id, full=full, region=region, customers=customers)
        result.timings["facts"] = time.perf_counter() - t
        if full:
            result.keys_compared = sum(facts.values())

        t = time.perf_counter()
        stage("classify")
        q.classify(store, run_id, rules, region)
        result.timings["classify"] = time.perf_counter() - t

        t = time.perf_counter()
        stage("queue")
        with self.queue_lock:
            counts = q.merge_queue(
                store, run_id, as_of, started=record["StartedAt"], full=full, region=region, customers=customers
            )
        result.findings, result.new, result.resolved = counts["findings"], counts["new"], counts["resolved"]
        record.update({"DriftNew": result.new, "DriftResolved": result.resolved})  # stored with the next stage
        result.timings["queue"] = time.perf_counter() - t

        t = time.perf_counter()
        stage("statement")
        q.write_statement_facts(store, run_id, rules)
        q.clear_facts(store, run_id, full=full, region=region)
        result.statement_rows = q.write_statement(store, run_id, region)
        result.residual_minor = q.statement_residual(store, run_id)
        self._prune_statements()
        result.open = sum(q.open_counts(store).values())
        result.timings["statement"] = time.perf_counter() - t
