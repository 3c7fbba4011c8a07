"""The ``tower`` command. Every configuration problem ends as one line on stderr and exit code 2."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tower_core.errors import ConfigError, StoreError, StoreUnreachable, one_line
from tower_core.settings import Settings
from tower_core.settings import load_settings as _load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Revenue Control Tower.")
err = Console(stderr=True, markup=False)  # messages quote input: never markup
out = Console(markup=False)


def load_settings(**overrides: object) -> Settings:
    return _load_settings(**overrides)


def _open(settings: Settings):
    from tower_core.store import open_store

    return open_store(settings)


@app.command()
def migrate() -> None:
    """Apply pending schema migrations (idempotent)."""
    from tower_core.store import migrate as run_migrations
    from tower_core.store import schema_version

    settings = load_settings()
    store = _open(settings)
    applied = run_migrations(store)
    if applied:
        for m in applied:
            out.print(f"applied {m.version:04d}_{m.name}")
    else:
        out.print("nothing to apply")
    out.print(f"schema version {schema_version(store)} ({settings.backend}, database {store.database})")


@app.command()
def status() -> None:
    """Backend, schema version and row counts per table."""
    from tower_core.store import schema_version, table_counts

    settings = load_settings()
    store = _open(settings)
    where = str(settings.data_dir) if settings.backend == "embedded" else "ClickHouse server"
    out.print(f"backend: {settings.backend} ({where})")
    out.print(f"database: {store.database}")
    out.print(f"schema version: {schema_version(store)}")
    table = Table("table", "rows")
    for name, rows in table_counts(store).items():
        table.add_row(name, f"{rows:,}")
    out.print(table)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default TOWER_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default TOWER_PORT).")] = None,
) -> None:
    """Run the API (collector, reconciler jobs) on this process's store."""
    import uvicorn

    from collector.app import create_app
    from collector.store_bring_up import StoreBringUp
    from reconciler.sla.definitions import days_read_back, load_definitions
    from tower_core.logs import configure as configure_logging
    from tower_core.ports import check_port_free
    from tower_core.settings import own_api_url
    from tower_core.store import migrate as run_migrations
    from tower_core.store import open_store
    from tower_core.store.telemetry_retention import apply_telemetry_retention

    settings = load_settings(host=host, port=port)
    if "api_url" not in settings.model_fields_set:  # what it calls itself (webhooks' externalURL): not :8000
        settings = settings.model_copy(update={"api_url": own_api_url(settings)})
    definitions = load_definitions(settings.sla_config)  # an invalid SLA file stops here: one line, its line number
    needed, keep = days_read_back(definitions), settings.telemetry_retention_days
    if keep is not None and 0 < keep < needed:
        raise ConfigError(
            f"TOWER_TELEMETRY_RETENTION_DAYS={keep} is shorter than the {needed} days the SLA definitions read back "
            f"(their longest period or burn-rate window, with its threshold and a day): set {needed} or more, or 0 "
            "to keep everything"
        )
    # uvicorn's own complaint about a taken port or a bad address was six log lines and exit 3, after the store
    # was opened and migrated
    check_port_free(settings.host, settings.port)
    configure_logging(settings.log_level)
    store = open_store(settings, connect=False)  # a bad URL or a chDB path another process holds stops here

    def ready_store() -> None:
        store.connect()
        run_migrations(store)
        if changed := apply_telemetry_retention(store, keep):
            logging.getLogger("tower.api").info(
                "telemetry kept %s: TTL set on %s", f"{keep} days" if keep else "for good", ", ".join(changed)
            )

    def stop_serving() -> None:
        server.should_exit = True  # not a signal to itself: uvicorn re-raises one, and the exit code would be lost

    bring_up = None
    try:
        ready_store()
    except StoreUnreachable as exc:  # a server that does not answer yet (restarting): waited for, ingest buffered
        logging.getLogger("tower.api").warning("%s: serving ingest into the write-ahead buffer meanwhile", exc)
        bring_up = StoreBringUp(store, ready_store, on_fatal=stop_serving)
    config = uvicorn.Config(
        create_app(settings, store, bring_up=bring_up),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
    )
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run, which has no hook for stop_serving
        server.run()
    if bring_up is not None and bring_up.fatal:  # it stopped because waiting cannot mend it
        raise ConfigError(bring_up.fatal)
    if not server.started:
        raise typer.Exit(3)  # uvicorn.run's code for a failed start (it has logged why)


@app.command()
def dashboard(
    port: Annotated[int | None, typer.Option(help="Port (default TOWER_DASHBOARD_PORT).")] = None,
) -> None:
    """Run the Streamlit dashboard (it reads everything from the API at TOWER_API_URL)."""
    from dashboard.launch import run_dashboard

    settings = load_settings(dashboard_port=port)
    raise typer.Exit(run_dashboard(settings))


@app.command()
def demo(
    reset: Annotated[bool, typer.Option("--reset", help="Delete the embedded data first.")] = False,
) -> None:
    """Start the API on the embedded store and the dashboard; Ctrl-C stops everything."""
    from tower_core.demo import run_demo

    raise typer.Exit(run_demo(load_settings(), reset=reset))


@app.command()
def reconcile(
    region: Annotated[str, typer.Option(help="Only this region, e.g. EU.")] = "",
    full: Annotated[bool, typer.Option("--full", help="Compare everything, not only what changed.")] = False,
    as_of: Annotated[
        str | None, typer.Option(help="Reconcile as of this ISO time, UTC unless it names a zone (default now).")
    ] = None,
) -> None:
    """Start a reconciliation run through the API (TOWER_API_URL, TOWER_API_TOKEN) and follow its progress."""
    import datetime as dt

    from reconciler.cli import reconcile_via_api

    when = None
    if as_of:
        try:
            when = dt.datetime.fromisoformat(as_of)
        except ValueError:
            raise ConfigError(f"--as-of {as_of!r} is not an ISO date-time") from None
        when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)  # the API wants a zone; the option says UTC
    raise typer.Exit(reconcile_via_api(load_settings(), region=region, full=full, as_of=when, console=out))


@app.command()
def reconciler() -> None:
    """Run the reconciler's scheduled jobs beside a ClickHouse server (TOWER_CLICKHOUSE_URL); Ctrl-C stops."""
    from reconciler.cli import run_reconciler
    from tower_core.logs import configure as configure_logging

    settings = load_settings()
    configure_logging(settings.log_level)
    raise typer.Exit(run_reconciler(settings))


def _add_simulate() -> None:
    from tower_core.simulate_cli import simulate_app

    app.add_typer(simulate_app, name="simulate")


_add_simulate()


def _add_token() -> None:
    from collector.token_cli import app as token_app

    app.add_typer(token_app, name="token")


_add_token()


def _add_ingest() -> None:
    from collector.dead_letter_cli import app as ingest_app

    app.add_typer(ingest_app, name="ingest")


_add_ingest()


def main() -> None:
    try:
        # without standalone mode, click returns a command's typer.Exit code instead of raising it: a failed run
        # of `tower reconcile` said so and exited 0
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except (ConfigError, StoreError) as exc:
        err.print(f"tower: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # usage errors: click's, or the copy of click that typer >= 0.29 bundles
        import click

        usage = (click.ClickException, getattr(typer, "TyperException", click.ClickException))  # typer < 0.29: click's
        if isinstance(exc, usage) and hasattr(exc, "format_message"):
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            message = one_line(str(exc.format_message()), 2000)
            if message:  # none: a group called without a command, whose help is already printed
                err.print(f"tower: error: {message}{hint}", markup=False, highlight=False, soft_wrap=True)
            sys.exit(getattr(exc, "exit_code", 2) or 2)
        raise


if __name__ == "__main__":
    main()
