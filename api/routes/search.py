"""``POST /v1/search``: multipart upload or JSON (image_base64 | image_url | image_id)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import ServiceDep, require_api_key
from api.errors import error_responses
from api.queries import decode_base64_image, image_bytes_from_reference
from api.schemas import SearchParams, SearchResponse
from retrieval.errors import InvalidRequestError
from retrieval.previews import preview_png
from retrieval.search import run_search

router = APIRouter(prefix="/v1", tags=["search"], dependencies=[Depends(require_api_key)])

FORM_FIELDS = ("k", "min_score", "group_by", "exclude_same_patient", "previews", "image_id", "image_url", "image_base64")

_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SearchParams.model_json_schema(ref_template="#/components/schemas/{model}")},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "k": {"type": "integer"},
                        "filters": {"type": "string", "description": "JSON object of filters"},
                        "min_score": {"type": "number"},
                        "group_by": {"type": "string", "enum": ["study", "image"]},
                        "exclude_same_patient": {"type": "boolean"},
                        "previews": {"type": "string", "enum": ["none", "url", "inline"]},
                    },
                    "required": ["file"],
                }
            },
        },
    }
}


def _validated(values: dict[str, Any]) -> SearchParams:
    try:
        return SearchParams.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def _parse(request: Request) -> tuple[SearchParams, bytes | None, str]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        values: dict[str, Any] = {k: form[k] for k in FORM_FIELDS if k in form and form[k] != ""}
        if "filters" in form and form["filters"]:
            try:
                values["filters"] = json.loads(str(form["filters"]))
            except ValueError:
                raise InvalidRequestError("filters: not a JSON object", detail={"field": "filters"}) from None
        params = _validated(values)
        if upload is None or isinstance(upload, str):
            if params.image_id is None and not params.image_url and not params.image_base64:
                raise InvalidRequestError("multipart search needs a `file` field", detail={"field": "file"})
            return params, None, ""
        return params, await upload.read(), upload.filename or "upload"
    if content_type.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise InvalidRequestError("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidRequestError("request body must be a JSON object")
        return _validated(body), None, ""
    raise InvalidRequestError("send multipart/form-data (field `file`) or application/json", detail={"content_type": content_type})


@router.post(
    "/search",
    response_model=SearchResponse,
    openapi_extra=_REQUEST_BODY,
    responses=error_responses(400, 401, 404, 413, 422, 503),
    summary="Find the studies most similar to a query image",
)
async def search(request: Request, service: ServiceDep) -> dict[str, Any]:
    started = time.perf_counter()
    params, upload, upload_name = await _parse(request)
    data: bytes | None = upload
    name = upload_name
    if data is None and params.image_base64:
        data, name = decode_base64_image(params.image_base64), "image_base64"
    elif data is None and params.image_url:
        data = await run_in_threadpool(image_bytes_from_reference, params.image_url, service.settings, field="image_url")
        name = "image_url"
    if data is None and params.image_id is None:
        raise InvalidRequestError("give exactly one of image_base64, image_url, image_id (or upload a file)")
    payload = await run_in_threadpool(
        run_search,
        service,
        data=data,
        data_name=name,
        image_id=params.image_id if data is None else None,
        k=params.k,
        filters=params.filters.to_filters(params.min_score),
        group_by=params.group_by,
        exclude_same_patient=params.exclude_same_patient,
    )
    base = str(request.base_url).rstrip("/")
    for result in payload["results"]:
        for image in result["images"]:
            if params.previews != "none":
                image["preview_url"] = f"{base}/v1/images/{image['image_id']}/preview.png"
            if params.previews == "inline":
                png = await run_in_threadpool(preview_png, service, image["image_id"])
                image["preview_png_base64"] = base64.b64encode(png).decode()
    payload["took_ms"] = round((time.perf_counter() - started) * 1e3, 2)
    return payload
