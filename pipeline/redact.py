"""Keep API keys out of error messages (and so out of logs, Prefect task states and artifacts).

The HTTP clients register every key they send (:func:`remember`); their error classes pass messages
through :func:`redact`, so a server that echoes the request's ``Authorization`` header in an error body
(some proxies do) cannot push the key into a log line.
"""

from __future__ import annotations

import threading

MASK = "***"
_SECRETS: set[str] = set()
_LOCK = threading.Lock()


def remember(secret: str | None) -> str | None:
    """Register ``secret`` (a key about to be sent) for redaction; return it unchanged."""
    if secret:
        with _LOCK:
            _SECRETS.add(secret)
    return secret


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    with _LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text
