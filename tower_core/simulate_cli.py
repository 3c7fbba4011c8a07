"""``tower simulate``: the synthetic estate (connectors/simulator) from the command line.

``bulk`` writes a whole estate into the store's state tables (it opens the store itself, so it refuses with
one line when the API owns the embedded path); ``run`` plays an estate at demo pace against a running API;
``manifest`` prints the ground truth of a seed without touching any store.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from tower_core.errors import ConfigError
from tower_core.settings import check_http_url

if TYPE_CHECKING:
    from connectors.simulator import EstateConfig, FaultRates

simulate_app = typer.Typer(no_args_is_help=True, help="The synthetic revenue estate (bulk load, demo pace).")
MAX_SEED = 2**63 - 1  # numpy's generators take non-negative 64-bit seeds
out = Console()
FaultsOpt = Annotated[str, typer.Option("--faults", help="Fault mix: default or clean.")]
# the options that decide a historical estate, shared by `bulk` and `manifest` (same values, same estate)
CustomersOpt = Annotated[int | None, typer.Option(min=1, help="Customers (default invoices/20, at least 200).")]
SeedOpt = Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Seed: same seed, same estate.")]
DaysOpt = Annotated[int, typer.Option(min=20, max=36_500, help="Length of the window, ending at --as-of.")]
AsOfOpt = Annotated[str, typer.Option(help="End of the window (UTC date or datetime).")]


def _rates(name: str) -> FaultRates:
    from connectors.simulator import FaultRates

    if name == "default":
        return FaultRates.default()
    if name == "clean":
        return FaultRates.clean()
    raise ConfigError(f"--faults must be 'default' or 'clean', not {name!r}")


def _config(**kwargs: object) -> EstateConfig:
    from connectors.simulator import EstateConfig

    try:
        return EstateConfig(**kwargs)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _historical(invoices: int, customers: int | None, seed: int, days: int, as_of: str, faults: str) -> EstateConfig:
    """The estate `bulk` writes and `manifest` describes, from the same options."""
    try:
        end = dt.datetime.fromisoformat(as_of)
        end = end if end.tzinfo else end.replace(tzinfo=dt.UTC)
        start = end - dt.timedelta(days=days)
    except (ValueError, OverflowError):
        raise ConfigError(f"--as-of {as_of!r} is not an ISO date with {days} days before it") from None
    return _config(
        seed=seed,
        customers=customers or max(200, invoices // 20),
        invoices=invoices,
        start=start,
        as_of=end,
        fault_rates=_rates(faults),
    )


@simulate_app.command()
def bulk(
    invoices: Annotated[int, typer.Option(min=1, help="Invoices to generate.")] = 1_000_000,
    customers: CustomersOpt = None,
    seed: SeedOpt = 7,
    days: DaysOpt = 60,
    as_of: AsOfOpt = "2026-03-01",
    faults: FaultsOpt = "default",
    manifest: Annotated[
        Path | None, typer.Option(help="Manifest JSON path (default .tower/manifest-<seed>.json).")
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the state tables' rows (default: empty them first).")
    ] = False,
) -> None:
    """Write a whole estate (customers, invoices, payments, ledger entries) into the store in columnar chunks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from connectors.simulator.bulk import bulk_load
    from tower_core.cli import load_settings
    from tower_core.store import migrate, open_store

    config = _historical(invoices, customers, seed, days, as_of, faults)
    path = manifest or Path(".tower") / f"manifest-{seed}.json"
    _check_writable(path)  # before the store holds an estate without its manifest
    settings = load_settings()
    store = open_store(settings)
    migrate(store)
    with Progress(
        TextColumn("[bold]bulk estate"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("invoices"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rows]:,} rows"),
        console=out,
        transient=False,
    ) as bar:
        task = bar.add_task("bulk", total=invoices, rows=0)
        written = 0

        def progress(table: str, rows: int, invoices_done: int) -> None:
            nonlocal written
            written += rows
            bar.update(task, completed=invoices_done, rows=written)

        result = bulk_load(store, config, fresh=not keep, manifest_path=path, progress=progress)
    for name, rows in result.rows.items():
        out.print(f"{name}: {rows:,} rows")
    counts = {k: v for k, v in result.manifest.counts().items() if v}
    out.print(f"{len(result.manifest):,} injected faults {counts}")
    out.print(f"manifest: {path}")
    out.print(f"done in {result.seconds:.1f} s")


@simulate_app.command()
def run(
    api_url: Annotated[
        str | None, typer.Option(help="The tower API receiving telemetry (default TOWER_API_URL).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port of the estate's API (default TOWER_SIMULATOR_PORT).")
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, max=MAX_SEED, help="Seed (default TOWER_SIMULATOR_SEED).")] = None,
    rate: Annotated[
        int | None, typer.Option(min=1, help="Invoices per minute (default TOWER_SIMULATOR_RATE_PER_MIN).")
    ] = None,
    customers: Annotated[int, typer.Option(min=1, help="Customers.")] = 200,
    minutes: Annotated[float, typer.Option(min=1, help="Length of the generated window.")] = 240,
    faults: FaultsOpt = "default",
    context_loss: Annotated[float, typer.Option(min=0, max=1, help="Share of flows losing trace context.")] = 0.3,
    id_offset: Annotated[int, typer.Option(min=0, help="First invoice number (fresh ranges per run).")] = 0,
    manifest: Annotated[Path | None, typer.Option(help="Write the manifest JSON here.")] = None,
) -> None:
    """Play an estate at demo pace: telemetry to the API, billing/ERP/CDP served on a loopback port."""
    from connectors.simulator.live import demo_config, run_live
    from tower_core.cli import load_settings
    from tower_core.logs import configure as configure_logging

    settings = load_settings()
    configure_logging(settings.log_level)
    try:
        config = demo_config(
            seed=settings.simulator_seed if seed is None else seed,
            rate_per_min=rate or settings.simulator_rate_per_min,
            horizon_min=minutes,
            customers=customers,
            fault_rates=_rates(faults),
            context_loss_share=context_loss,
            id_offset=id_offset,
        )
    except (ValueError, OverflowError) as exc:
        raise ConfigError(str(exc)) from None
    if api_url is not None:  # checked as TOWER_API_URL is: a bad one ran for good, failing every export
        try:
            check_http_url(api_url, "--api-url ")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if manifest is not None:
        _check_writable(manifest)  # one line now, not a traceback when the run ends
    stop = threading.Event()

    def handle(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    try:
        run_live(
            config,
            api_url or settings.api_url,
            port=port or settings.simulator_port,
            stop=stop,
            manifest_path=manifest,
            say=lambda line: out.print(line, markup=False, highlight=False, soft_wrap=True),
        )
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None


def _check_writable(path: Path) -> None:
    """One line now, not a traceback once the estate is written: the manifest's place must take a file."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if path.is_dir():
        raise ConfigError(f"--manifest {path} is a directory")
    if not parent.is_dir() or not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"--manifest {path} cannot be written")


@simulate_app.command("manifest")
def manifest_cmd(
    invoices: Annotated[int, typer.Option(min=1, help="Invoices (generated in memory: keep it modest).")] = 2000,
    customers: CustomersOpt = None,
    seed: SeedOpt = 7,
    days: DaysOpt = 60,
    as_of: AsOfOpt = "2026-03-01",
    faults: FaultsOpt = "default",
) -> None:
    """Print the manifest of a seed's estate, built in memory (no store involved): with the same options, the
    manifest `bulk` writes."""
    from connectors.simulator import Estate

    estate = Estate.generate(_historical(invoices, customers, seed, days, as_of, faults))
    print(estate.manifest.to_json())
