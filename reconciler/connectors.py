"""Which connectors a run pulls from: a small registry keyed by ``TOWER_RECONCILE_CONNECTORS``.

``none`` compares what already is in the state tables (written by webhooks, the simulator's bulk mode or
another process); ``stripe-tryton`` builds the Stripe billing and Tryton ERP connectors from their settings;
``simulator`` the HTTP client of the simulated estate. Other components may ``register`` more names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from connectors.base import BillingConnector, ErpConnector
from tower_core.errors import ConfigError
from tower_core.settings import Settings


@dataclass
class Connectors:
    billing: BillingConnector | None = None
    erp: ErpConnector | None = None
    cdp: Any = None

    def describe(self) -> dict[str, str]:
        return {
            "billing": getattr(self.billing, "name", "") if self.billing else "",
            "erp": getattr(self.erp, "name", "") if self.erp else "",
            "cdp": getattr(self.cdp, "name", "") if self.cdp else "",
        }


Factory = Callable[[Settings], Connectors]
_REGISTRY: dict[str, Factory] = {}


def register(name: str, factory: Factory) -> None:
    _REGISTRY[name] = factory


def _none(settings: Settings) -> Connectors:
    return Connectors()


def _stripe_tryton(settings: Settings) -> Connectors:
    from connectors.stripe.connector import StripeBilling
    from connectors.tryton.connector import TrytonErp

    return Connectors(billing=StripeBilling.from_settings(settings), erp=TrytonErp.from_settings(settings))


def _simulator(settings: Settings) -> Connectors:
    """The simulator's HTTP client (issue 4), looked up by convention so this module needs no import of it."""
    try:
        module = importlib.import_module("connectors.simulator.client")
    except ImportError:
        raise ConfigError("TOWER_RECONCILE_CONNECTORS=simulator, but the simulator client is not installed") from None
    build = getattr(module, "connectors_from_settings", None)
    if build is None:
        raise ConfigError("connectors.simulator.client has no connectors_from_settings(settings)")
    billing, erp, *rest = build(settings)
    return Connectors(billing=billing, erp=erp, cdp=rest[0] if rest else None)


register("none", _none)
register("stripe-tryton", _stripe_tryton)
register("simulator", _simulator)


def build(settings: Settings) -> Connectors:
    name = settings.reconcile_connectors.strip().lower() or "none"
    factory = _REGISTRY.get(name)
    if factory is None:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"TOWER_RECONCILE_CONNECTORS={name!r} is not one of: {known}")
    try:
        return factory(settings)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot build the {name} connectors: {exc}") from None
