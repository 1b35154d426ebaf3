"""Network reachability, and failing fast with a clear message when something must come from the Hub offline."""

from __future__ import annotations

import os
import socket
from functools import cache
from urllib.parse import urlparse

from src.utils.errors import ConfigError


def reachable(url: str, timeout: float) -> bool:
    """True if a TCP connection to ``url``'s host (port 443 unless it names one) opens within ``timeout`` seconds."""
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except (OSError, TypeError):  # TypeError: no host in the URL
        return False


@cache
def hub_reachable(timeout: float = 5.0) -> bool:
    """True if the Hugging Face Hub answers (``HF_ENDPOINT``) and offline mode (``HF_HUB_OFFLINE``) is off."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    return reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


def require_hub(what: str, setting: str, hint: str) -> None:
    """Raise ConfigError naming ``what`` needs the Hub and how to use local files instead."""
    if not hub_reachable():
        raise ConfigError(
            f"{what} must be downloaded from the Hugging Face Hub, which is unreachable from this "
            f"machine (or HF_HUB_OFFLINE is set). Set {setting} to {hint}, or run where the Hub is "
            "reachable."
        )
