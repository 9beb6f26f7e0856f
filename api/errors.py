"""One JSON error shape for every failure: ``{"error": {"code", "message", "detail"}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.limits import BodyTooLarge
from retrieval.errors import RetrievalError

logger = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    code: str
    message: str
    detail: dict[str, Any] = {}


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error shape for the given statuses."""
    return {status: {"model": ErrorResponse} for status in statuses}


def _payload(code: str, message: str, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "detail": detail or {}}}


def _field(location: tuple[Any, ...] | list[Any]) -> str:
    """A validation error's place as a dotted path in the JSON body (FastAPI's leading ``body`` dropped)."""
    parts = list(location)
    if parts[:1] == ["body"]:
        parts = parts[1:]
    return ".".join(str(part) for part in parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RetrievalError)
    async def _retrieval_error(_request: Request, exc: RetrievalError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _field(e.get("loc", ())), "message": e.get("msg", "").removeprefix("Value error, ")}
            for e in exc.errors()
        ]
        message = "; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors) or "invalid request"
        return JSONResponse(_payload("invalid_request", message, {"errors": errors}), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            _payload("internal_error", f"internal error ({type(exc).__name__}); the server log has the details"),
            status_code=500,
        )

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(_request: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse(exc.error.to_dict(), status_code=exc.error.http_status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http_error")
        return JSONResponse(_payload(code, str(exc.detail)), status_code=exc.status_code)
