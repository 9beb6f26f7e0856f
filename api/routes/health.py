"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import MetricsDep, ServiceDep, SettingsDep, require_api_key
from api.schemas import ServiceInfo

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers (no authentication); on the event loop, so busy worker threads never delay it."""
    return {"status": "ok"}


@router.get("/readyz", dependencies=[Depends(require_api_key)], responses={503: {"description": "not ready"}})
def readyz(service: ServiceDep) -> JSONResponse:
    """Ready when the database answers, the model is loaded and the index equals the database."""
    checks = service.readiness()
    ready = all(value is True for value in checks.values())
    body: dict[str, Any] = {"status": "ready" if ready else "not ready", "checks": checks}
    if service.encoder_loaded:
        body["weights"] = service.model_info()["weights"]
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    dependencies=[Depends(require_api_key)],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition"}},
)
def metrics(collector: MetricsDep) -> Response:
    """Prometheus metrics: request latency per route, encode / search timings, ingest and archive counts."""
    return Response(collector.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info", dependencies=[Depends(require_api_key)], response_model=ServiceInfo)
def info(request: Request, service: ServiceDep, settings: SettingsDep) -> dict[str, Any]:
    """What the web page needs at start: model, whether the weights are MedVAE's, the active space, limits."""
    warnings = service.placeholder_warnings()
    return {
        "version": request.app.version,
        "model": settings.model.name,
        "weights": service.model_info()["weights"],
        "random_weights": bool(warnings),
        "warning": " ".join(warnings) or None,
        "text_search": service.has_text_tower,
        "space": service.space_info(),
        "max_request_bytes": settings.api.max_request_bytes,
        "ingest_enabled": bool(settings.ingest.root_list or settings.dicomweb.allowed_url_list),
        "dicomweb_sources": settings.dicomweb.allowed_url_list,
    }
