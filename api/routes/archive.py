"""Stored studies and images: metadata, previews decoded from z, raw latents, spaces."""

from __future__ import annotations

import io
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Response
from starlette.concurrency import run_in_threadpool

from api.deps import RowId, ServiceDep, SpacesDep, require_api_key
from api.errors import error_responses
from api.schemas import SPACE_KEY_PATTERN, ImageDetail, SpaceInfo, StudyDetail
from retrieval.errors import NotFoundError
from retrieval.query.previews import PREVIEW_NOTE, preview_png
from retrieval.query.results import image_json, study_json
from retrieval.spaces import space_json

router = APIRouter(prefix="/v1", tags=["archive"], dependencies=[Depends(require_api_key)])

SpaceParam = Annotated[
    str | None,
    Query(pattern=SPACE_KEY_PATTERN, description="Space key or its first 8+ characters (default: the server's)."),
]


def _image_or_404(service: Any, image_id: int) -> Any:
    image = service.store.images_by_id([image_id]).get(image_id)
    if image is None:
        raise NotFoundError(f"image {image_id} does not exist", detail={"image_id": image_id})
    return image


@router.get("/studies/{study_id}", response_model=StudyDetail, responses=error_responses(401, 404))
def get_study(study_id: RowId, service: ServiceDep) -> dict[str, Any]:
    study = service.store.study_with_images(study_id)
    if study is None:
        raise NotFoundError(f"study {study_id} does not exist", detail={"study_id": study_id})
    images = [dict(image_json(image), preview_url=f"/v1/images/{image.id}/preview.png") for image in study.images]
    return {"study": study_json(study), "images": images, "weights": service.model_info()["weights"]}


@router.get("/images/{image_id}", response_model=ImageDetail, responses=error_responses(401, 404))
def get_image(image_id: RowId, service: ServiceDep) -> dict[str, Any]:
    image = _image_or_404(service, image_id)
    return {
        **image_json(image),
        "preview_url": f"/v1/images/{image.id}/preview.png",
        "study": study_json(image.study),
        "frames": image.frames,
        "kind": image.kind,
        "weights": service.model_info()["weights"],
    }


@router.get(
    "/images/{image_id}/preview.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **error_responses(401, 404, 409)},
)
async def get_preview(image_id: RowId, spaces: SpacesDep, space: SpaceParam = None) -> Response:
    """The MedVAE reconstruction decoded from the stored latent (decoded once, then kept on disk; not the original
    pixels). For a volume (3-D space, ``?space=KEY``): its middle sagittal, coronal and axial slices side by side."""
    service = await run_in_threadpool(spaces.get, space)
    png = await run_in_threadpool(preview_png, service, image_id)
    key = (service.space.encoder_key, image_id)
    headers = {
        "Cache-Control": "public, max-age=86400, immutable",
        "ETag": f'"{key[0][:16]}-{image_id}"',
        "X-Preview-Note": PREVIEW_NOTE,
        "X-Weights": service.model_info()["weights"],
    }
    return Response(content=png, media_type="image/png", headers=headers)


@router.get(
    "/images/{image_id}/latent.npy",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **error_responses(401, 404, 409)},
)
def get_latent(image_id: RowId, spaces: SpacesDep, space: SpaceParam = None) -> Response:
    """The stored posterior-mode z of the image, ``(C, h, w)`` float16 (``(C, X, Y, Z)`` for a volume), as ``.npy``.

    For a volume, ``X-Voxel-Spacing-Mm`` gives the mm per voxel of the model input it encodes (``x,y,z``;
    one z cell spans the model's downsampling factor of them)."""
    service = spaces.get(space)
    z = service.stored_latent(image_id)
    buffer = io.BytesIO()
    np.save(buffer, z.astype(np.float16))
    headers = {"Content-Disposition": f'attachment; filename="image-{image_id}-z.npy"'}
    spacing = service.store.latent_spacings([image_id], service.space.encoder_key).get(image_id)
    if spacing is not None:
        headers["X-Voxel-Spacing-Mm"] = ",".join(f"{value:.6g}" for value in spacing)
    return Response(content=buffer.getvalue(), media_type="application/octet-stream", headers=headers)


@router.get("/spaces", response_model=list[SpaceInfo], responses=error_responses(401))
def list_spaces(service: ServiceDep) -> list[dict[str, Any]]:
    """Every embedding space of the archive; ``active`` is the server's default, others are searched with ``space``."""
    active = service.space.key
    return [
        {**space_json(space), "images": service.store.vector_stats(space.id)[0], "active": space.key == active}
        for space in service.store.list_spaces()
    ]
