"""Fetch an image by URL for a query, without becoming a proxy into the private network.

Contract of :func:`fetch_image_url`: http(s) only; every address the host resolves to must be
global (no loopback, private, link-local, multicast, reserved) unless the host is on the
allow-list; redirects are followed by hand (at most 3), each hop checked the same way; the body is
capped at ``max_bytes``; the **whole** fetch (name lookups, every hop, the body) ends within
``timeout`` seconds, however slowly a server drips bytes; at most :data:`MAX_CONCURRENT_FETCHES`
run at once in a process, so slow URLs can never take every server thread (one more is a 503
``busy``). Violations raise :class:`InvalidRequestError` naming the field ``image_url``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from urllib.parse import urljoin, urlparse

import httpx

from retrieval.errors import BusyError, InvalidRequestError

MAX_REDIRECTS = 3
MAX_CONCURRENT_FETCHES = 8
_in_flight = threading.BoundedSemaphore(MAX_CONCURRENT_FETCHES)


def printable(text: str) -> str:
    """``text`` safe to echo in UTF-8 (a lone surrogate becomes ``\\ud800``)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _refuse(message: str, url: str) -> InvalidRequestError:
    shown = printable(url)
    return InvalidRequestError(f"image_url: {printable(message)}", detail={"field": "image_url", "url": shown})


async def check_url(url: str, *, allow_hosts: set[str]) -> None:
    """Raise unless ``url`` is http(s) and its host resolves only to global addresses (or is allowed)."""
    try:
        parsed = urlparse(url)
        host, port = parsed.hostname, parsed.port
    except ValueError as exc:  # a bad port or bracket
        raise _refuse(f"not a valid URL ({exc})", url) from None
    if parsed.scheme not in ("http", "https") or not host:
        raise _refuse("only http and https URLs with a host are accepted", url)
    if host in allow_hosts:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port or (443 if parsed.scheme == "https" else 80), type=socket.SOCK_STREAM
        )
    except (OSError, UnicodeError) as exc:
        raise _refuse(f"cannot resolve host {host!r} ({exc})", url) from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global:
            raise _refuse(f"host {host!r} resolves to a non-public address ({address}); refused", url)


def fetch_image_url(url: str, *, max_bytes: int, timeout: float, allow_hosts: set[str]) -> bytes:
    """Download ``url`` under the guards above; returns the body. Call it from a worker thread."""
    if not _in_flight.acquire(blocking=False):
        raise BusyError(
            f"image_url: {MAX_CONCURRENT_FETCHES} URL fetches are already running; retry shortly",
            detail={"field": "image_url"},
        )
    try:
        return asyncio.run(_fetch_within(url, max_bytes=max_bytes, timeout=timeout, allow_hosts=allow_hosts))
    finally:
        _in_flight.release()


async def _fetch_within(url: str, *, max_bytes: int, timeout: float, allow_hosts: set[str]) -> bytes:
    try:
        async with asyncio.timeout(timeout):
            return await _fetch(url, max_bytes=max_bytes, timeout=timeout, allow_hosts=allow_hosts)
    except TimeoutError:
        raise _refuse(f"download did not finish within {timeout:g} s", url) from None


async def _fetch(url: str, *, max_bytes: int, timeout: float, allow_hosts: set[str]) -> bytes:
    current = url
    async with httpx.AsyncClient(follow_redirects=False, timeout=timeout) as client:
        for _ in range(MAX_REDIRECTS + 1):
            await check_url(current, allow_hosts=allow_hosts)
            try:
                async with client.stream("GET", current) as response:
                    if response.is_redirect:
                        current = urljoin(current, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise _refuse(f"server answered HTTP {response.status_code}", url)
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body.extend(chunk)
                        if len(body) > max_bytes:
                            raise _refuse(f"image is larger than {max_bytes} bytes", url)
                    return bytes(body)
            except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:
                raise _refuse(f"download failed ({type(exc).__name__}: {exc})", url) from None
    raise _refuse(f"more than {MAX_REDIRECTS} redirects", url)
