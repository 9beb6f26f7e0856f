"""The API's own documentation (``/openapi.json``, ``/docs``, ``/redoc``) behind the same key as every route.

FastAPI serves these without any dependency; they are turned off there and served here, so with
``RETRIEVAL_API_KEYS`` set they need ``Authorization: Bearer <key>`` like everything but ``/healthz``.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse

from api.deps import require_api_key

OPENAPI_URL = "/openapi.json"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"

router = APIRouter(include_in_schema=False, dependencies=[Depends(require_api_key)])


@router.get(OPENAPI_URL)
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=OPENAPI_URL, title=f"{request.app.title} - Swagger UI", oauth2_redirect_url=OAUTH2_REDIRECT_URL
    )


@router.get(OAUTH2_REDIRECT_URL)
def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=OPENAPI_URL, title=f"{request.app.title} - ReDoc")
