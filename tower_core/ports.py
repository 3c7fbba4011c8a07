"""Whether a loopback service of the tower can listen where it is told to, asked before starting it."""

from __future__ import annotations

import socket

from tower_core.errors import ConfigError


def check_port_free(host: str, port: int) -> None:
    """Streamlit reports a port in use and exits 0, and `tower demo` would talk to whatever answers there: ask
    first, so the command fails as it should. SO_REUSEADDR as servers set it: a port whose last connections
    linger in TIME_WAIT is free, one something listens on not."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
