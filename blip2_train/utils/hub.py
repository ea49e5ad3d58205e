"""Loading from the Hugging Face hub without hanging on a machine that cannot reach it."""

from __future__ import annotations

import os
import socket


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub answers (or HF_HUB_OFFLINE is unset and a proxy is configured)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return bool(os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"))


def local_only(name_or_path: str) -> bool:
    """Load from a local dir or the cache only (no network retries) when the hub is unreachable."""
    return os.path.isdir(str(name_or_path)) or not hub_reachable()
