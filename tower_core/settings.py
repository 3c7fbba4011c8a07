"""One settings object for every component (environment prefix ``TOWER_``).

Every field is documented in README's Configuration table; tests check that the two agree.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from tower_core.logs import LEVELS as LOG_LEVELS
from tower_core.models import DRIFT_CLASSES, GRACE_CLASSES

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# what the reconciler's maps fall back to without a `*` entry, as without the setting at all
DEFAULT_GRACE_S = 7200
DEFAULT_TOLERANCE_ABS_MINOR = 1
_TOKEN = re.compile(r"[\x21-\x7e]+")
_LISTED_SECRET = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")  # printable; spaces only inside
_CURRENCY = re.compile(r"[A-Z]{3}")
MAX_RULE_VALUE = 10**15  # a tolerance (minor units, basis points) or grace (seconds): far above any real one
# The longest interval, timeout or backoff a setting takes (a year): past it the scheduler's date arithmetic
# overflowed at start (a traceback, or a crash), and the flusher's wait ended its thread while ingest said 200.
MAX_SECONDS = 366 * 86_400
# DOMAIN.md section 2's business-key attributes: what TOWER_KEY_ATTRIBUTE_MAP may map other names onto
# (collector/correlation.py reads the same ones; a test checks they agree)
KEY_ATTRIBUTE_TARGETS = (
    "revops.customer.id",
    "revops.cdp.user_id",
    "revops.invoice.id",
    "revops.payment.id",
    "revops.ledger.entry.id",
)


class Settings(BaseSettings):
    """Tower configuration; read from the environment (``TOWER_*``) and an optional ``.env`` file."""

    model_config = SettingsConfigDict(env_prefix="TOWER_", env_file=".env", extra="ignore")

    # --- store
    data_dir: Path = Field(Path(".tower/data"), description="chDB data path (embedded backend).")
    database: str = Field("tower", description="ClickHouse database holding the tower's tables.")
    clickhouse_url: str | None = Field(
        None,
        description="ClickHouse server URL, e.g. http://user:pass@host:8123/tower; unset = embedded chDB.",
    )
    clickhouse_connect_timeout_s: float = Field(
        5.0, gt=0, le=MAX_SECONDS, description="Connect timeout for the server backend."
    )
    clickhouse_query_timeout_s: float = Field(
        300.0,
        gt=0,
        le=MAX_SECONDS,
        description="How long the server backend waits for a query's answer before failing it (a hung server "
        "would hold a request or run this long); a full run at 10M invoices takes tens of seconds.",
    )

    # --- API server
    host: str = Field("127.0.0.1", description="Address `tower serve` binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port `tower serve` listens on.")
    api_url: str = Field(
        "http://127.0.0.1:8000", description="Where the CLI, dashboard and other processes reach the API."
    )
    dashboard_host: str = Field("127.0.0.1", description="Address the Streamlit dashboard binds to.")
    dashboard_port: int = Field(8501, ge=1, le=65535, description="Port of the Streamlit dashboard.")
    dashboard_token: SecretStr | None = Field(
        None,
        description="Bearer token the dashboard sends to the API (else TOWER_API_TOKEN, else it asks once per "
        "session); its role decides which action buttons show; never logged.",
    )
    dashboard_timeout_s: float = Field(
        10.0, gt=0, le=MAX_SECONDS, description="Timeout of one dashboard call to the API (seconds)."
    )
    dashboard_refresh_s: float = Field(
        2.0, gt=0, le=MAX_SECONDS, description="How often the dashboard refreshes a running action's status (seconds)."
    )

    # --- security
    admin_token: SecretStr | None = Field(
        None, description="Bootstrap admin bearer token (create named tokens with it); never logged."
    )

    log_level: str = Field(
        "INFO", description="Level of the tower's own log lines on stderr: DEBUG, INFO, WARNING or ERROR."
    )
    # --- SLA engine (reconciler/sla)
    sla_config: Path | None = Field(
        None, description="SLA definitions YAML; unset = the shipped default (reconciler/sla/config/sla.yaml)."
    )
    sla_clock_skew_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="How far the systems' clocks may differ (s): a target system's activity up to this long before "
        "a step's start ends the step (latency 0), as an ERP whose clock runs behind billing's stamps a prompt "
        "posting before the finalization; set it to the largest difference between your systems' clocks.",
    )
    sla_eval_interval_s: float = Field(
        60.0,
        ge=0,
        le=MAX_SECONDS,
        description="How often `tower serve` evaluates the SLAs (seconds); 0 = only through the API.",
    )
    sla_max_regions: int = Field(
        20,
        ge=1,
        description="Regions an SLA evaluates separately (the busiest); the rest are one region `other`. Regions "
        "come from the data (revops.region): without a cap a client could grow /metrics and the alerts without end.",
    )
    alertmanager_url: str | None = Field(
        None, description="Prometheus Alertmanager base URL (alerts go to /api/v2/alerts); unset = none."
    )
    alertmanager_resend_s: float = Field(
        60.0, gt=0, lt=300, description="Re-send firing alerts this often (s); below Alertmanager's resolve_timeout."
    )
    sla_webhook_urls: list[str] = Field(
        default_factory=list, description="URLs receiving Alertmanager-format (version 4) webhooks, JSON list."
    )
    sla_dashboard_url: str | None = Field(
        None, description="Dashboard link in alert annotations; unset = http://dashboard_host:dashboard_port."
    )

    @field_validator(
        "alertmanager_url", "sla_dashboard_url", "api_url", "stripe_api_base", "tryton_url", "simulator_url"
    )
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_http_url(value, "")
        return value

    @field_validator("sla_webhook_urls")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        for i, url in enumerate(value):
            check_http_url(url, f"entry {i} ")
        return value

    # --- reconciler (issue 5)
    api_token: SecretStr | None = Field(
        None, description="Bearer token the CLI sends to TOWER_API_URL (e.g. for `tower reconcile`); never logged."
    )
    reconcile_scheduler: bool = Field(
        True, description="Run the reconciler's scheduled jobs (runs, action retries) inside `tower serve`."
    )
    reconcile_interval_s: float = Field(
        300.0, ge=0, le=MAX_SECONDS, description="Incremental reconciliation every N seconds (0 = off)."
    )
    reconcile_full_interval_s: float = Field(
        86400.0, ge=0, le=MAX_SECONDS, description="Full reconciliation every N seconds (0 = off)."
    )
    reconcile_actions_interval_s: float = Field(
        15.0, ge=0, le=MAX_SECONDS, description="Retry due corrective actions every N seconds (0 = off)."
    )
    reconcile_connectors: str = Field(
        "none",
        description="Connectors runs pull from: `none` (compare the state tables), `simulator`, `stripe-tryton`.",
    )
    reconcile_auto_correct: bool = Field(
        False,
        description="Correct technical classes (missing_in_erp, payment_unapplied, refund_unposted) automatically.",
    )
    reconcile_tolerance_abs_minor: dict[str, int] = Field(
        default_factory=lambda: {"*": DEFAULT_TOLERANCE_ABS_MINOR},
        description='Absolute amount tolerance in minor units per currency, JSON; `*` = default: {"*": 1, "JPY": 0}.',
    )
    reconcile_tolerance_rel_bp: dict[str, int] = Field(
        default_factory=lambda: {"*": 0},
        description='Relative amount tolerance in basis points per currency, JSON; `*` = default: {"*": 0}.',
    )
    reconcile_grace_s: dict[str, int] = Field(
        default_factory=lambda: {"*": DEFAULT_GRACE_S},
        description="Grace period in seconds per drift class whose gap is a side not there yet (missing_in_erp, "
        "payment_unapplied, refund_unposted, customer_unsynced; inside it the gap is stale_sync), JSON; `*` = default.",
    )
    reconcile_match_window_days: int = Field(
        31, ge=0, le=3660, description="Date window of 1:N / N:1 matching by customer and sum."
    )
    reconcile_statement_keep_runs: int = Field(
        20, ge=1, description="Statements kept of the latest runs (each run writes its scope's whole statement)."
    )
    reconcile_statement_keep_days: int = Field(
        90, ge=0, le=3660, description="Days for which each day's last run keeps its statement (0 = none)."
    )
    reconcile_action_attempts: int = Field(
        4, ge=1, description="Attempts per execution of a corrective action (transient errors)."
    )
    reconcile_action_backoff_s: float = Field(
        0.5, ge=0, le=MAX_SECONDS, description="First backoff between attempts; doubles up to the max."
    )
    reconcile_action_backoff_max_s: float = Field(
        30.0, ge=0, le=MAX_SECONDS, description="Longest backoff between attempts (seconds)."
    )
    reconcile_action_max_attempts: int = Field(
        20, ge=1, description="Attempts across executions before an action goes to the dead-letter list."
    )
    reconcile_breaker_failures: int = Field(
        5, ge=1, description="Consecutive failures that open a target system's breaker."
    )
    reconcile_breaker_reset_s: float = Field(
        30.0, gt=0, le=MAX_SECONDS, description="Seconds an open breaker waits before a trial call."
    )

    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed cross-origin API access, JSON list; empty = none."
    )
    api_max_body_bytes: int = Field(1024 * 1024, gt=0, description="Body cap of JSON API requests (413 beyond).")

    # --- collector
    wal_dir: Path = Field(Path(".tower/wal"), description="Directory of the collector's write-ahead buffer.")
    wal_max_bytes: int = Field(256 * 1024 * 1024, gt=0, description="Write-ahead buffer bound; full => 503.")
    telemetry_retention_days: int | None = Field(
        None,
        ge=0,
        le=3650,
        description="Days spans, business events and their key links are kept, from their own time; 0 = for good "
        "(their TTLs removed); unset = their TTLs left as they are. Set as ClickHouse TTLs at `tower serve` start.",
    )
    flush_rows: int = Field(5000, ge=1, description="Flush the buffer to the store once this many rows wait.")
    flush_interval_s: float = Field(
        1.0, gt=0, le=MAX_SECONDS, description="Flush the buffer at least this often (seconds)."
    )
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Request body cap after decompression (413).")
    key_attribute_map: dict[str, str] = Field(
        default_factory=dict,
        description='Extra attribute names mapped onto revops keys, JSON: {"stripe.invoice_id": "revops.invoice.id"}.',
    )

    # --- connectors (secrets are SecretStr: never printed, never logged)
    stripe_api_key: SecretStr | None = Field(None, description="Stripe secret API key for pulls; never logged.")
    stripe_api_base: str = Field("https://api.stripe.com", description="Stripe API base URL (localstripe in tests).")
    stripe_webhook_secrets: list[SecretStr] = Field(
        default_factory=list,
        description='Stripe webhook endpoint secrets, JSON list; several during rotation: ["whsec_new","whsec_old"].',
    )
    stripe_webhook_tolerance_s: int = Field(
        300, gt=0, description="Max age of a Stripe-Signature timestamp (seconds); replays older are refused."
    )
    stripe_default_region: str = Field(
        "", description="revops.region for Stripe objects whose metadata carries no `region`."
    )
    ingest_tokens: list[SecretStr] = Field(
        default_factory=list,
        description="Bearer tokens /v1/traces and /v1/events accept, JSON list (several during rotation); "
        "empty = ingest only from loopback peers unless TOWER_INGEST_OPEN.",
    )
    ingest_open: bool = Field(
        False,
        description="Without TOWER_INGEST_TOKENS, accept ingest from any host (an OTel Collector receiver's "
        "default); off: only from loopback.",
    )
    cdp_write_keys: list[SecretStr] = Field(
        default_factory=list, description="Accepted Segment/RudderStack write keys (basic-auth user), JSON list."
    )
    cdp_pii_mode: str = Field("hash", description="PII traits: `hash` (keyed HMAC-SHA256) or `drop`, before storage.")
    cdp_pii_hmac_key: SecretStr | None = Field(
        None, description="Key of the PII HMAC; required when CDP write keys are set and the mode is hash."
    )
    cdp_pii_fields: list[str] = Field(
        default_factory=lambda: [
            "email",
            "phone",
            "name",
            "firstName",
            "lastName",
            "first_name",
            "last_name",
            "address",
            "street",
            "postal_code",
            "birthday",
            "mobile",
            "ip",
            "username",
        ],
        description="Trait/property names treated as PII, JSON list. Case and separators do not matter, and a name"
        " of 5 letters or more also matches inside longer ones (`email` in `billing_email`); values holding an"
        " e-mail address are PII under any name.",
    )
    cdp_customer_id_traits: list[str] = Field(
        default_factory=lambda: ["billing_customer_id", "stripe_customer_id", "customer_id"],
        description="Traits holding the billing customer id (revops.customer.id); else the userId/groupId.",
    )
    cdp_default_region: str = Field("", description="revops.region for CDP events whose traits carry no `region`.")
    tryton_url: str = Field("http://127.0.0.1:8000", description="Tryton server URL (JSON-RPC at /DB/rpc/).")
    tryton_database: str = Field("tower", description="Tryton database name.")
    tryton_user: str = Field("admin", description="Tryton login.")
    tryton_password: SecretStr | None = Field(None, description="Tryton password; never logged.")
    tryton_timeout_s: float = Field(
        10.0, gt=0, le=MAX_SECONDS, description="Timeout of one Tryton JSON-RPC call (seconds)."
    )
    tryton_payment_method: str = Field("Cash", description="Tryton invoice payment method used to apply payments.")

    # --- simulated estate (connectors/simulator; `tower simulate`, `tower demo`)
    simulator_url: str = Field(
        "http://127.0.0.1:8600", description="Where the tower reaches the simulated estate's billing/ERP/CDP API."
    )
    simulator_port: int = Field(
        8600, ge=0, le=65535, description="Port the demo-pace estate serves its loopback API on."
    )
    simulator_timeout_s: float = Field(
        10.0, gt=0, le=MAX_SECONDS, description="Timeout of one call to the simulated estate (seconds)."
    )
    simulator_seed: int = Field(7, description="Seed of the demo-pace estate.")
    simulator_rate_per_min: int = Field(60, ge=1, description="Invoices per minute the demo-pace estate emits.")

    @field_validator("database")
    @classmethod
    def _database_is_identifier(cls, value: str) -> str:
        if not _IDENT.fullmatch(value):  # not match: ``$`` lets a final newline through (a Secret's value)
            raise ValueError(f"database name {value!r} must match {_IDENT.pattern}")
        return value

    @field_validator("key_attribute_map")
    @classmethod
    def _key_targets_known(cls, value: dict[str, str]) -> dict[str, str]:
        # a typo in a target ("revops.invoice_id") dropped the mapping without a word: spans were acknowledged
        # and their invoices never found
        for attr, target in value.items():
            if target not in KEY_ATTRIBUTE_TARGETS:
                raise ValueError(f"{attr!r} maps onto {target!r}, not one of {', '.join(KEY_ATTRIBUTE_TARGETS)}")
        return value

    @field_validator("reconcile_tolerance_abs_minor", "reconcile_tolerance_rel_bp", "reconcile_grace_s")
    @classmethod
    def _not_negative(cls, value: dict[str, int]) -> dict[str, int]:
        # the reconcile SQL reads them as Int64 (grace in milliseconds): a larger one wrapped negative
        for key, n in value.items():
            if not 0 <= n <= MAX_RULE_VALUE:
                raise ValueError(f"{key!r} is {n}; must be 0 to {MAX_RULE_VALUE}")
        return value

    @field_validator("reconcile_grace_s")
    @classmethod
    def _class_keys(cls, value: dict[str, int]) -> dict[str, int]:
        # a misspelt class ("missing-in-erp") was kept and never matched: that class kept the default grace; and a
        # class no gap of which is a timing one (missing_in_billing) was accepted and had no effect
        for key in value:
            if key != "*" and key not in DRIFT_CLASSES:
                raise ValueError(f"{key!r} is not a drift class ({', '.join(DRIFT_CLASSES)}) or * (the default)")
            if key != "*" and key not in GRACE_CLASSES:
                raise ValueError(
                    f"{key!r} has no grace period: only {', '.join(GRACE_CLASSES)} wait for a side not there yet "
                    "(inside their grace a gap is stale_sync)"
                )
        return value

    @field_validator("stripe_webhook_secrets", "ingest_tokens", "cdp_write_keys")
    @classmethod
    def _no_blank_secret(cls, value: list[SecretStr]) -> list[SecretStr]:
        # an empty entry (a rotation template's unset variable) was a key anyone holds: a webhook signed with ""
        # was accepted
        for i, secret in enumerate(value):
            if not _LISTED_SECRET.fullmatch(secret.get_secret_value()):
                raise ValueError(f"entry {i} must be non-empty printable ASCII, without spaces at either end")
        return value

    @field_validator("reconcile_tolerance_abs_minor", "reconcile_tolerance_rel_bp")
    @classmethod
    def _currency_keys(cls, value: dict[str, int]) -> dict[str, int]:
        # a key that is no currency code ("usd") was kept and never matched: that currency kept the default
        for key in value:
            if key != "*" and not _CURRENCY.fullmatch(key):
                raise ValueError(f"{key!r} is not an ISO 4217 currency code (like USD) or * (the default)")
        return value

    @field_validator("api_token", "dashboard_token", "admin_token")
    @classmethod
    def _header_safe(cls, value: SecretStr | None) -> SecretStr | None:
        # sent in an HTTP header: anything but printable ASCII failed inside the HTTP client with a traceback
        if value is not None and not _TOKEN.fullmatch(value.get_secret_value()):
            raise ValueError("must be non-empty printable ASCII without spaces (it is sent in an HTTP header)")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level_known(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"must be {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}")
        return value.upper()

    @field_validator("cdp_pii_mode")
    @classmethod
    def _pii_mode_known(cls, value: str) -> str:
        if value not in ("hash", "drop"):
            raise ValueError("must be hash or drop")
        return value

    @model_validator(mode="after")
    def _pii_key_when_hashing(self) -> Settings:
        if self.cdp_write_keys and self.cdp_pii_mode == "hash" and not self.cdp_pii_hmac_key:
            raise ValueError("TOWER_CDP_PII_HMAC_KEY is required when CDP write keys are set and PII mode is hash")
        return self

    @property
    def backend(self) -> str:
        return "server" if self.clickhouse_url else "embedded"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (FastAPI dependency and CLI default)."""
    return Settings()


_FIELD = re.compile(r'field "([a-z0-9_]+)"')


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment (and ``overrides``), or a ConfigError saying in one line which variable is
    wrong and why: a typo in a JSON-typed variable (a list, a map) fails before validation, as a SettingsError."""
    from tower_core.errors import ConfigError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        if not where:  # a rule across settings: its message names them
            raise ConfigError(f"invalid settings: {first.get('msg')}") from None
        raise ConfigError(f"invalid setting TOWER_{where.upper()}: {first.get('msg')}") from None
    except SettingsError as exc:
        m = _FIELD.search(str(exc))
        where = f"TOWER_{m.group(1).upper()}" if m else "a TOWER_ variable"
        raise ConfigError(f"invalid setting {where}: not valid JSON (a list or a map is expected)") from None


def check_http_url(url: str, what: str) -> None:
    """An http(s) URL httpx can send to (a port that is no number failed at start with a traceback). The URL is
    not echoed: it may hold credentials, and a webhook's path may be its token."""
    import httpx

    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{what}is not an http(s) URL")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        parsed = None
    if parsed is None or not parsed.host:
        raise ValueError(f"{what}is not a valid URL (check its host and port)")


def own_api_url(settings: Settings) -> str:
    """Where ``tower serve`` answers, from TOWER_HOST and TOWER_PORT (a wildcard bind is reached on loopback):
    what the API calls itself (webhooks' externalURL) when TOWER_API_URL is not set."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"
