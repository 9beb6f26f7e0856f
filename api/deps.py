"""Dependency vocabulary of the routes: the services, the settings, metrics, the API-key check.

Routes take these typed dependencies and never read ``app.state`` themselves; this module is the
one place that knows where the application keeps them.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from api.schemas import MAX_ROW_ID
from retrieval.config import Settings
from retrieval.errors import RetrievalError
from retrieval.service import SpaceService
from retrieval.spaces import SpaceServices


class UnauthorizedError(RetrievalError):
    code = "unauthorized"
    http_status = 401


def get_service(request: Request) -> SpaceService:
    return request.app.state.service


def get_spaces(request: Request) -> SpaceServices:
    """Every stored space's service: ``spaces.get(key)`` (key or 8+ character prefix; ``None`` = the default)."""
    return request.app.state.spaces


def service_for_space(request: Request, space: str | None) -> SpaceService:
    """The service of the named space (key or 8+ character prefix); the configured one when ``None``."""
    return get_spaces(request).get(space)


def get_metrics(request: Request) -> Any:
    """The app's :class:`api.metrics.Metrics`."""
    return request.app.state.metrics


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def require_api_key(request: Request) -> None:
    """When API keys are configured, demand ``Authorization: Bearer <key>`` (constant-time compare)."""
    keys: list[str] = request.app.state.settings.api.key_list
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
        raise UnauthorizedError("missing or wrong API key: send `Authorization: Bearer <key>`")


ServiceDep = Annotated[SpaceService, Depends(get_service)]
#: database row ids: positive 32-bit integers (PostgreSQL ``integer``); anything else is a 422, never a 500
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SpacesDep = Annotated[SpaceServices, Depends(get_spaces)]
MetricsDep = Annotated[Any, Depends(get_metrics)]
