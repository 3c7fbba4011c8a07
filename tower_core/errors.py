"""Error types shared by every component.

ConfigError is what the CLI turns into one line and exit code 2; StoreError wraps backend errors so that
callers never depend on chDB's or clickhouse-connect's exception classes.
"""


class ConfigError(Exception):
    """The configuration cannot work (unreachable store, unwritable path, locked data dir...)."""


class StoreError(Exception):
    """A query or insert failed in the storage backend."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class StoreUnreachable(StoreError):
    """The store's server did not answer (refused, timed out): worth waiting for, unlike a refused login."""


def one_line(text: str, limit: int = 500) -> str:
    """Whitespace and line breaks collapsed (a proxy's HTML page spread an error over eight lines), then cut."""
    return " ".join(text.split())[:limit]
