"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import require_api_key

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
        count, _ = service.store.vector_stats(service.space.id)
        checks["index_consistent"] = service.index.count == count
    else:
        checks["index_consistent"] = False
    ready = all(value is True for value in checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    if service.encoder_loaded:
        body["weights"] = service.model_info()["weights"]
    return JSONResponse(body, status_code=200 if ready else 503)
