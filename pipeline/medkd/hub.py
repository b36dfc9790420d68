"""Reaching the Hugging Face hub: a probe that answers in seconds, so an offline machine gets one line
naming `--weights` instead of the libraries' minute of retries."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from huggingface_hub import constants

HUB_TIMEOUT_S = 3.0  # a reachable hub (or proxy) accepts a TCP connection in well under this


def hub_unreachable() -> str:
    """Why the Hugging Face hub cannot be reached ("" when it can), found out in seconds instead of the
    library's minute of retries: offline mode, or no TCP connection to the endpoint (HF_ENDPOINT) or to
    the proxy that requests to it go through."""
    if constants.HF_HUB_OFFLINE or _is_true(os.environ.get("HF_HUB_OFFLINE")):
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = getproxies().get(url.scheme)
    via = ""
    if proxy and not proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        via = f" via the proxy {proxy_url.hostname}:{proxy_url.port or 80}"
        host, port = proxy_url.hostname or host, proxy_url.port or 80
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as err:
        return f"{constants.ENDPOINT}{via} unreachable: {err.strerror or type(err).__name__}"
    return ""


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")
