"""Fetch an image by URL for a query, without becoming a proxy into the private network.

Contract of :func:`fetch_image_url`: http(s) only; every address the host resolves to must be
global (no loopback, private, link-local, multicast, reserved) unless the host is on the
allow-list; redirects are followed by hand (at most 3), each hop checked the same way; the body is
capped at ``max_bytes`` and the whole fetch at ``timeout`` seconds. Violations raise
:class:`InvalidRequestError` naming the field ``image_url``.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urljoin, urlparse

import httpx

from retrieval.errors import InvalidRequestError

MAX_REDIRECTS = 3


def _refuse(message: str, url: str) -> InvalidRequestError:
    return InvalidRequestError(f"image_url: {message}", detail={"field": "image_url", "url": url})


def check_url(url: str, *, allow_hosts: set[str]) -> None:
    """Raise unless ``url`` is http(s) and its host resolves only to global addresses (or is allowed)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise _refuse("only http and https URLs with a host are accepted", url)
    host = parsed.hostname
    if host in allow_hosts:
        return
    try:
        infos = socket.getaddrinfo(host, parsed.port or (443 if parsed.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise _refuse(f"cannot resolve host {host!r} ({exc})", url) from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise _refuse(f"host {host!r} resolves to a non-public address ({address}); refused", url)


def fetch_image_url(url: str, *, max_bytes: int, timeout: float, allow_hosts: set[str]) -> bytes:
    """Download ``url`` under the guards above; returns the body."""
    current = url
    with httpx.Client(follow_redirects=False, timeout=timeout) as client:
        for _ in range(MAX_REDIRECTS + 1):
            check_url(current, allow_hosts=allow_hosts)
            try:
                with client.stream("GET", current) as response:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        current = urljoin(current, location)
                        continue
                    if response.status_code != 200:
                        raise _refuse(f"server answered HTTP {response.status_code}", url)
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body.extend(chunk)
                        if len(body) > max_bytes:
                            raise _refuse(f"image is larger than {max_bytes} bytes", url)
                    return bytes(body)
            except httpx.HTTPError as exc:
                raise _refuse(f"download failed ({type(exc).__name__}: {exc})", url) from None
    raise _refuse(f"more than {MAX_REDIRECTS} redirects", url)
