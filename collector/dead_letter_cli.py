"""``tower ingest dead-letters|requeue``: the records the store refused for good (collector/dead_letter.py).

The box lives in the serving process's write-ahead buffer directory. Requeueing appends to that buffer, so it
goes through the API (operator role, audited); listing reads the box directly when no API answers.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from collector.dead_letter import DeadLetterBox
from collector.token_cli import ViaApi, api_is_up
from tower_core.errors import ConfigError
from tower_core.redact import redact_url

app = typer.Typer(no_args_is_help=True, help="The collector's dead-letter box: records the store refuses.")
out = Console(soft_wrap=True, highlight=False, markup=False)  # names and ids are data, not markup
PATH = "/api/ingest/dead-letters"
PURPOSE = "an operator token to reach the dead-letter box through it"


def _settings():  # type: ignore[no-untyped-def]
    from tower_core.cli import load_settings

    return load_settings()


@app.command("dead-letters")
def dead_letters(limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 100) -> None:
    """Records set aside, oldest first, with the store's reason."""
    settings = _settings()
    if api_is_up(settings):
        doc = ViaApi(settings, PURPOSE).call("GET", PATH, params={"limit": limit})
        items: list[dict[str, Any]] = [e for e in doc.get("items") or [] if isinstance(e, dict) and "name" in e]
        total, where = int(doc.get("total") or len(items)), f"through the API at {redact_url(settings.api_url)}"
    else:
        if not settings.wal_dir.is_dir():  # a mistyped TOWER_WAL_DIR read as an empty box: "0 record(s) set aside"
            raise ConfigError(
                f"no API answers at {redact_url(settings.api_url)}, and the write-ahead buffer directory "
                f"{settings.wal_dir} (TOWER_WAL_DIR) does not exist: nothing to read the dead-letter box from"
            )
        everything = DeadLetterBox(settings.wal_dir / "dead-letter").entries()
        items, total, where = everything[:limit], len(everything), f"in {settings.wal_dir / 'dead-letter'}"
    # the name is what `requeue` takes: never wrapped or cut, whatever the terminal's width
    table = Table()
    table.add_column("name", no_wrap=True, min_width=max((len(e["name"]) for e in items), default=4))
    for column in ("kind", "rows", "set aside", "reason"):
        table.add_column(column)
    for e in items:
        row = (e.get("kind", ""), e.get("rows", ""), e.get("set_aside_at", ""), str(e.get("error", ""))[:160])
        table.add_row(e["name"], *map(str, row))
    out.print(table)
    out.print(f"{total} record(s) set aside ({where})")


@app.command()
def requeue(name: Annotated[str, typer.Argument(help="A name from `tower ingest dead-letters`.")]) -> None:
    """Send one record back into the write-ahead buffer once its cause is fixed (through the API)."""
    settings = _settings()
    if not api_is_up(settings):
        raise ConfigError(
            f"no API answers at {redact_url(settings.api_url)}: a requeue appends to its buffer; start `tower serve`"
        )
    doc = ViaApi(settings, PURPOSE).call("POST", f"{PATH}/{name}/requeue")
    out.print(f"requeued {doc.get('name', name)}: {doc.get('rows')} {doc.get('kind')} back in the buffer")
