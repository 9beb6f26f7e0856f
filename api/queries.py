"""Turning a request's query (upload, base64, URL) into image bytes; the API never reads local paths."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.schemas import QueryImage
from retrieval.config import Settings
from retrieval.errors import InvalidRequestError
from retrieval.query.fetch import fetch_image_url

Params = TypeVar("Params", bound=QueryImage)


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
        allow = {host.strip() for host in settings.api.url_allow_hosts.split(",") if host.strip()}
        return fetch_image_url(
            reference, max_bytes=settings.api.max_request_bytes, timeout=settings.api.url_fetch_timeout, allow_hosts=allow
        )
    if "://" in reference[:16] or reference.startswith(("/", "./", "~")):
        raise InvalidRequestError(
            f"{field}: only http(s) URLs and base64 images are accepted; local paths are never read",
            detail={"field": field},
        )
    return decode_base64_image(reference, field=field)


def parse_json(text: str | bytes, *, field: str) -> Any:
    """Parse JSON from a request; invalid or too deeply nested JSON is a 400 naming ``field``."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = "nests too deeply" if isinstance(exc, RecursionError) else "is not valid JSON"
        raise InvalidRequestError(f"{field} {reason}", detail={"field": field}) from None


def _validated(model: type[Params], values: dict[str, Any]) -> Params:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def parse_query_request(request: Request, model: type[Params]) -> tuple[Params, bytes | None, str]:
    """Parameters and (for multipart) the uploaded file's bytes and name.

    multipart/form-data: field ``file`` plus the model's other fields as form fields (``filters``
    as a JSON string); application/json: the model as a JSON object.
    """
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        # every form field but the file is a parameter: an unknown one is refused by the model, as in JSON
        values: dict[str, Any] = {
            name: value for name, value in form.items() if name not in ("file", "filters") and value != ""
        }
        if form.get("filters"):
            values["filters"] = parse_json(str(form["filters"]), field="filters")
        for name in ("positive", "negative"):  # form fields: comma-separated image ids
            if name in values:
                values[name] = [part.strip() for part in str(values[name]).split(",") if part.strip()]
        params = _validated(model, values)
        if upload is None or isinstance(upload, str):
            # search only: positive examples and a text are queries of their own
            alone = getattr(params, "positive", None) or getattr(params, "text", None)
            if params.image_id is None and not params.image_url and not params.image_base64 and not alone:
                raise InvalidRequestError("a multipart request needs a `file` field", detail={"field": "file"})
            return params, None, ""
        return params, await upload.read(), upload.filename or "upload"
    if content_type.startswith("application/json"):
        body = parse_json(await request.body(), field="body")
        if not isinstance(body, dict):
            raise InvalidRequestError("request body must be a JSON object")
        return _validated(model, body), None, ""
    raise InvalidRequestError(
        "send multipart/form-data (field `file`) or application/json", detail={"content_type": content_type}
    )


async def query_image_bytes(
    params: QueryImage, upload: bytes | None, upload_name: str, settings: Settings
) -> tuple[bytes | None, str]:
    """The query's bytes and a name for messages; ``(None, "")`` when the query is a stored image id."""
    if upload is not None:
        return upload, upload_name
    if params.image_base64:
        return decode_base64_image(params.image_base64), "image_base64"
    if params.image_url:
        data = await run_in_threadpool(image_bytes_from_reference, params.image_url, settings, field="image_url")
        return data, "image_url"
    if params.image_id is None:
        raise InvalidRequestError("give exactly one of image_base64, image_url, image_id (or upload a file)")
    return None, ""
