"""Whether the Hugging Face Hub can be reached, asked before anything waits on it."""

from __future__ import annotations

import os


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers; checked first so that an offline machine fails
    at once, not after the hub client's minute of retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
