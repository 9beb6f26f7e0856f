"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from api.deps import require_api_key
from api.schemas import ServiceInfo
from retrieval.model.weights import RANDOM_WEIGHTS_WARNING

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers (no authentication)."""
    return {"status": "ok"}


@router.get("/readyz", dependencies=[Depends(require_api_key)], responses={503: {"description": "not ready"}})
def readyz(request: Request) -> JSONResponse:
    """Ready when the database answers, the model is loaded and the index equals the database."""
    service = request.app.state.service
    checks: dict[str, Any] = {}
    try:
        with service.store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = True
    except Exception as exc:  # noqa: BLE001 - readiness reports, never raises
        checks["database"] = f"{type(exc).__name__}: {exc}"
    checks["model_loaded"] = service.encoder_loaded
    if service.encoder_loaded and checks["database"] is True:
        index = service.searchable_index()
        count, _ = service.store.vector_stats(service.space.id)
        checks["index_consistent"] = index.count == count
    else:
        checks["index_consistent"] = False
    ready = all(value is True for value in checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    if service.encoder_loaded:
        body["weights"] = service.model_info()["weights"]
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    dependencies=[Depends(require_api_key)],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition"}},
)
def metrics(request: Request) -> Response:
    """Prometheus metrics: request latency per route, encode / search timings, ingest and archive counts."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info", dependencies=[Depends(require_api_key)], response_model=ServiceInfo)
def info(request: Request) -> dict[str, Any]:
    """What the web page needs at start: model, whether the weights are random, the active space, limits."""
    service = request.app.state.service
    settings = request.app.state.settings
    random_weights = settings.uses_random_weights
    return {
        "version": request.app.version,
        "model": settings.model,
        "weights": service.model_info()["weights"],
        "random_weights": random_weights,
        "warning": RANDOM_WEIGHTS_WARNING if random_weights else None,
        "space": service.space_info(),
        "max_request_bytes": settings.max_request_bytes,
        "ingest_enabled": bool(settings.ingest_root_list or settings.dicomweb_allowed_url_list),
        "dicomweb_sources": settings.dicomweb_allowed_url_list,
    }
