"""``POST /v1/search``: multipart upload or JSON (image_base64 | image_url | image_id | text, or an image and a text)."""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Depends, Request
from starlette.concurrency import run_in_threadpool

from api.deps import SpacesDep, require_api_key
from api.errors import error_responses
from api.queries import parse_query_request, query_image_bytes
from api.schemas import SearchParams, SearchResponse, inline_json_schema
from retrieval.errors import InvalidRequestError
from retrieval.query.previews import previews_for
from retrieval.query.search import Query, SearchOptions
from retrieval.query.search import search as run_query

router = APIRouter(prefix="/v1", tags=["search"], dependencies=[Depends(require_api_key)])

_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_json_schema(SearchParams)},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "k": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "filters": {"type": "string", "description": "JSON object of filters"},
                        "min_score": {"type": "number"},
                        "group_by": {"type": "string", "enum": ["study", "image", "patient"]},
                        "exclude_same_patient": {"type": "boolean"},
                        "previews": {"type": "string", "enum": ["none", "url", "inline"]},
                        "sort": {"type": "string", "enum": ["score", "psnr", "ssim"]},
                        "positive": {"type": "string", "description": "comma-separated stored image ids (more like these)"},
                        "negative": {"type": "string", "description": "comma-separated stored image ids (less like these)"},
                        "exclude_self": {"type": "boolean"},
                        "rerank": {"type": "string", "enum": ["none", "latent"]},
                        "rerank_depth": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "text": {"type": "string", "description": "text query combined with the file (pooling biomedclip)"},
                        "text_weight": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                    "required": ["file"],
                }
            },
        },
    }
}


@router.post(
    "/search",
    response_model=SearchResponse,
    openapi_extra=_REQUEST_BODY,
    responses=error_responses(400, 401, 404, 409, 413, 422, 503),
    summary="Find the studies most similar to a query image",
)
async def search(request: Request, spaces: SpacesDep, background_tasks: BackgroundTasks) -> dict[str, Any]:
    """``space`` picks the embedding space (GET /v1/spaces); a 3-D space takes a NIfTI upload or a series id."""
    started = time.perf_counter()
    params, upload, upload_name = await parse_query_request(request, SearchParams)
    service = await run_in_threadpool(spaces.get, params.space)
    no_image = upload is None and not (params.image_base64 or params.image_url or params.image_id)
    if no_image and not (params.positive or params.text):
        raise InvalidRequestError("give exactly one of image_base64, image_url, image_id, text (or upload a file)",
                                  detail={"field": "image"})
    data, name = (None, "") if no_image else await query_image_bytes(params, upload, upload_name, service.settings)
    query = Query(data=data, data_name=name, image_id=params.image_id if data is None else None,
                  positive=tuple(params.positive), negative=tuple(params.negative), text=params.text,
                  text_weight=params.text_weight)
    options = SearchOptions(
        k=params.k,
        filters=params.filters.to_filters(params.min_score),
        group_by=params.group_by,
        exclude_same_patient=params.exclude_same_patient,
        sort=params.sort,
        exclude_self=params.exclude_self,
        rerank=params.rerank,
        rerank_depth=params.rerank_depth,
    )
    payload = await run_in_threadpool(run_query, service, query, options)
    base = str(request.base_url).rstrip("/")
    in_space = "" if service is spaces.default else f"?space={service.space.key}"
    images = [image for result in payload["results"] for image in result["images"]]
    previews = previews_for(service)
    if params.previews == "inline":  # the whole page in decoder batches, each preview decoded once per space
        await run_in_threadpool(previews.warm, [image["image_id"] for image in images])
    elif params.previews == "url":  # decoded in batches right after the answer; the page's requests wait on them
        background_tasks.add_task(run_in_threadpool, previews.warm, [image["image_id"] for image in images])
    for image in images:
        if params.previews != "none":
            image["preview_url"] = f"{base}/v1/images/{image['image_id']}/preview.png{in_space}"
        if params.previews == "inline":
            png = await run_in_threadpool(previews.png, image["image_id"])
            image["preview_png_base64"] = base64.b64encode(png).decode()
    payload["took_ms"] = round((time.perf_counter() - started) * 1e3, 2)
    return payload
