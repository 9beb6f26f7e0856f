"""``POST /v1/similarity-map``: where a query and a stored image match, cell by cell of the latent grid."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from api.deps import ServiceDep, require_api_key
from api.errors import error_responses
from api.queries import parse_query_request, query_image_bytes
from api.schemas import (
    MAX_ROW_ID,
    SimilarityParams,
    SimilarityResponse,
    inline_json_schema,
)
from retrieval.query.previews import pixels_to_png, previews_for
from retrieval.query.similarity import query_latent, similarity_map
from retrieval.service import SpaceService

router = APIRouter(prefix="/v1", tags=["search"], dependencies=[Depends(require_api_key)])

SIMILARITY_NOTE = (
    "Cosine similarity of the stage-2 latent cells at the same position (each cell covers "
    "input_size/rows pixels of the padded square input); previews are MedVAE reconstructions."
)

_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": inline_json_schema(SimilarityParams)
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "target_image_id": {"type": "integer", "minimum": 1, "maximum": MAX_ROW_ID},
                    },
                    "required": ["file", "target_image_id"],
                }
            },
        },
    }
}


def _compare(service: SpaceService, data: bytes | None, name: str, params: SimilarityParams) -> dict[str, Any]:
    z = query_latent(service, data=data, name=name, image_id=params.image_id)
    result = similarity_map(service, z, params.target_image_id)
    if data is None and params.image_id is not None:  # a stored query: its preview is (or becomes) cached
        query_png = previews_for(service).png(params.image_id)
    else:  # an upload: decoded once, here (the decoder runs in OpenVINO on the CPU)
        query_png = pixels_to_png(service.encoder.decode(z[None])[0])
    rows, cols = result.cells.shape
    return {
        "target_image_id": params.target_image_id,
        "score": round(result.score, 6),
        "grid": {"rows": rows, "cols": cols, "cells": np.round(result.cells, 4).tolist()},
        "query_preview_png_base64": base64.b64encode(query_png).decode(),
        "target_preview_url": f"/v1/images/{params.target_image_id}/preview.png",
        "weights": service.model_info()["weights"],
        "note": SIMILARITY_NOTE,
    }


@router.post(
    "/similarity-map",
    response_model=SimilarityResponse,
    openapi_extra=_REQUEST_BODY,
    responses=error_responses(400, 401, 404, 413, 422, 503),
    summary="Cell-by-cell similarity of a query and a stored image (for a heat map)",
)
async def similarity(request: Request, service: ServiceDep) -> dict[str, Any]:
    params, upload, upload_name = await parse_query_request(request, SimilarityParams)
    data, name = await query_image_bytes(params, upload, upload_name, service.settings)
    return await run_in_threadpool(_compare, service, data, name, params)
