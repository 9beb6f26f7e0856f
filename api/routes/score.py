"""``POST /score``: the MedVAE endpoint card's schema (``columns = ["image_path", "decode"]``).

Each row's ``image_path`` is a base64 image or an http(s) URL (never a local path); the response's
``latent`` is the stage-2 latent ``(C, h, w)`` of the posterior mode (what ``MVAE.forward``
returns), ``decoded`` (when asked) the reconstruction as 8-bit ``(H, W)`` rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from api.deps import ServiceDep, require_api_key
from api.errors import error_responses
from api.queries import image_bytes_from_reference
from api.schemas import ScoreRequest, ScoreResponse
from retrieval.errors import InvalidRequestError
from retrieval.imaging.decode import decode_bytes
from retrieval.service import SpaceService

router = APIRouter(tags=["score"], dependencies=[Depends(require_api_key)])


def _score(service: SpaceService, request: ScoreRequest) -> dict[str, Any]:
    if service.is_volume_space:
        raise InvalidRequestError("/score encodes 2-D images; this server's space is 3-D", detail={"field": "input_data"})
    columns = request.input_data.columns
    if "image_path" not in columns:
        raise InvalidRequestError("input_data.columns must include `image_path`", detail={"field": "input_data.columns"})
    path_at, decode_at = columns.index("image_path"), columns.index("decode") if "decode" in columns else None
    predictions = []
    for number, row in enumerate(request.input_data.data):
        if len(row) != len(columns) or not isinstance(row[path_at], str):
            raise InvalidRequestError(
                f"input_data.data[{number}]: expected {len(columns)} values with a string image_path",
                detail={"field": f"input_data.data[{number}]"},
            )
        want_decoded = bool(row[decode_at]) if decode_at is not None and row[decode_at] is not None else False
        data = image_bytes_from_reference(row[path_at], service.settings, field=f"input_data.data[{number}].image_path")
        decoded = decode_bytes(data, name=f"input_data.data[{number}]", max_pixels=service.settings.ingest.max_image_pixels)
        z = service.embed(decoded)[0][None]
        latent = service.encoder.s2_latent(z)[0].numpy()
        prediction: dict[str, Any] = {"latent": np.round(latent, 5).tolist()}
        if want_decoded:
            image = service.encoder.decode(z)[0]
            prediction["decoded"] = np.round(image * 255.0).astype(np.uint8).tolist()
        predictions.append(prediction)
    return {"predictions": predictions, "weights": service.model_info()["weights"]}


@router.post(
    "/score",
    response_model=ScoreResponse,
    response_model_exclude_none=True,
    responses=error_responses(400, 401, 413, 422, 503),
)
async def score(request: ScoreRequest, service: ServiceDep) -> dict[str, Any]:
    """Latent (and optionally decoded image) per row, as the MedVAE endpoint card describes."""
    return await run_in_threadpool(_score, service, request)
