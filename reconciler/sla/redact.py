"""Receiver URLs are credentials: a Slack-style webhook URL's path is its bearer token, and an Alertmanager URL
may carry ``user:password``. Whatever the tower reports (API answers) or logs about a receiver names it by
scheme, host and port only; the rest is replaced by ``***``.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import httpx

from tower_core.redact import MARK, redact_url


def _secret_parts(url: str) -> list[str]:
    """The substrings of ``url`` that must never be shown, longest first."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return [url]
    out = [url]
    try:
        out.append(str(httpx.URL(url)))  # httpx's normalized spelling, as its messages show it
    except httpx.InvalidURL:
        pass
    if parts.netloc and "@" in parts.netloc:
        out.append(parts.netloc.rsplit("@", 1)[0])
    out += [p for p in (password, parts.path.strip("/"), parts.query, parts.fragment) if p]
    return sorted(set(out), key=len, reverse=True)


def scrub(text: str, *urls: str) -> str:
    """``text`` with every secret part of ``urls`` replaced by the marker (whole URLs by their redacted form)."""
    for url in urls:
        for part in _secret_parts(url):
            text = text.replace(part, redact_url(url) if part == url else MARK)
    return text


def describe_error(exc: httpx.HTTPError, *urls: str) -> str:
    """An httpx error as one line without secrets: httpx puts the full request URL in its messages."""
    if isinstance(exc, httpx.HTTPStatusError):
        resp = exc.response
        text = f"HTTP {resp.status_code} {resp.reason_phrase} from {redact_url(str(exc.request.url))}"
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return scrub(text, *urls).replace("\n", " ")


class _SecretUrlFilter(logging.Filter):
    """Redacts registered URLs in httpx's own request log ('HTTP Request: POST <url> ...', level INFO)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets and isinstance(record.args, tuple):
            record.args = tuple(self._arg(a) for a in record.args)
        return True

    def _arg(self, arg: object) -> object:
        if isinstance(arg, httpx.URL | str):
            text = str(arg)
            if any(text.startswith(s) for s in self.secrets):
                return redact_url(text)
        return arg


_HTTPX_FILTER = _SecretUrlFilter()


def hide_from_httpx_log(url: str) -> None:
    """Keep ``url`` out of httpx's request log (the filter is installed once, on the 'httpx' logger)."""
    _HTTPX_FILTER.secrets.add(str(httpx.URL(url)))
    logging.getLogger("httpx").addFilter(_HTTPX_FILTER)  # a no-op when already installed
