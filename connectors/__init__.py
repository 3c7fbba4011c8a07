"""Adapters to the real systems and the simulator, all behind connectors.base's interfaces."""
