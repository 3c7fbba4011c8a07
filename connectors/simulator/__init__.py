"""The simulated revenue estate: seeded CDP, billing and ERP with fault injection and a ground-truth manifest.

See docs/contracts.md (API) and docs/simulator.md (data conventions and fault footprints).
"""

from connectors.simulator.config import EstateConfig, Timing
from connectors.simulator.estate import Estate
from connectors.simulator.faults import FAULT_NAMES, FAULTS, FaultRates, InjectedFault, Manifest

__all__ = ["FAULTS", "FAULT_NAMES", "Estate", "EstateConfig", "FaultRates", "InjectedFault", "Manifest", "Timing"]
