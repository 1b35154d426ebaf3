"""Fail fast, with a clear message, when something must come from the Hugging Face Hub offline."""

from __future__ import annotations

import os
import socket
from functools import cache
from urllib.parse import urlparse

from src.utils.errors import ConfigError


@cache
def hub_reachable(timeout: float = 5.0) -> bool:
    """True if a TCP connection to the Hub opens within ``timeout`` seconds (and offline mode is off)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def require_hub(what: str, setting: str, hint: str) -> None:
    """Raise ConfigError naming ``what`` needs the Hub and how to use local files instead."""
    if not hub_reachable():
        raise ConfigError(
            f"{what} must be downloaded from the Hugging Face Hub, which is unreachable from this "
            f"machine (or HF_HUB_OFFLINE is set). Set {setting} to {hint}, or run where the Hub is "
            "reachable."
        )
