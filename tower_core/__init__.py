"""Shared core of Revenue Control Tower: settings, the ClickHouse store and its schema, canonical models, CLI."""

from tower_core.errors import ConfigError, StoreError
from tower_core.settings import Settings, get_settings

__all__ = ["ConfigError", "Settings", "StoreError", "get_settings"]
