"""URLs are credentials: a Slack-style webhook URL's path is its bearer token, and an API or Alertmanager URL may
carry ``user:password``. What the tower reports or logs about such a URL names it by scheme, host and port only.
"""

from __future__ import annotations

from urllib.parse import urlsplit

MARK = "***"


def redact_url(url: str) -> str:
    """'https://u:p@hooks.example/services/T/B/X?q=1' -> 'https://***@hooks.example/***'."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return MARK
    if not parts.scheme or not host:
        return MARK
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    if parts.username is not None or parts.password is not None:
        netloc = f"{MARK}@{netloc}"
    rest = f"/{MARK}" if parts.path.strip("/") or parts.query or parts.fragment else ""
    return f"{parts.scheme}://{netloc}{rest}"
