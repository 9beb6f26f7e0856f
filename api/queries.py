"""Turning a request's query (upload, base64, URL) into image bytes; the API never reads local paths."""

from __future__ import annotations

import base64
import binascii

from retrieval.errors import InvalidRequestError
from retrieval.fetch import fetch_image_url
from retrieval.settings import Settings


def decode_base64_image(text: str, *, field: str = "image_base64") -> bytes:
    """Bytes of a base64 string, with or without a ``data:...;base64,`` prefix."""
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{field}: not valid base64", detail={"field": field}) from None
    if not data:
        raise InvalidRequestError(f"{field}: decodes to an empty file", detail={"field": field})
    return data


def image_bytes_from_reference(reference: str, settings: Settings, *, field: str) -> bytes:
    """An ``http(s)://`` URL (fetched under the SSRF guards) or base64 text; nothing else."""
    if reference.startswith(("http://", "https://")):
        allow = {host.strip() for host in settings.url_allow_hosts.split(",") if host.strip()}
        return fetch_image_url(
            reference, max_bytes=settings.max_request_bytes, timeout=settings.url_fetch_timeout, allow_hosts=allow
        )
    if "://" in reference[:16] or reference.startswith(("/", "./", "~")):
        raise InvalidRequestError(
            f"{field}: only http(s) URLs and base64 images are accepted; local paths are never read",
            detail={"field": field},
        )
    return decode_base64_image(reference, field=field)
