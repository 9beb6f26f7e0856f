"""Dependency vocabulary of the routes: the service, the settings, the API-key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request

from api.schemas import MAX_ROW_ID
from retrieval.errors import RetrievalError
from retrieval.service import RetrievalService
from retrieval.config import Settings


class UnauthorizedError(RetrievalError):
    code = "unauthorized"
    http_status = 401


def get_service(request: Request) -> RetrievalService:
    return request.app.state.service


def service_for_space(request: Request, space: str | None) -> RetrievalService:
    """The service of the named space (key or 8+ character prefix); the configured one when ``None``."""
    return request.app.state.spaces.get(space)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def require_api_key(request: Request) -> None:
    """When API keys are configured, demand ``Authorization: Bearer <key>`` (constant-time compare)."""
    keys: list[str] = request.app.state.settings.api_key_list
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
        raise UnauthorizedError("missing or wrong API key: send `Authorization: Bearer <key>`")


ServiceDep = Annotated[RetrievalService, Depends(get_service)]
#: database row ids: positive 32-bit integers (PostgreSQL ``integer``); anything else is a 422, never a 500
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
