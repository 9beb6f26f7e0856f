"""The FastAPI application: ``create_app(settings)`` builds it; state lives on ``app.state``."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api import web
from api.errors import install_error_handlers
from api.limits import BodySizeLimitMiddleware
from api.metrics import Metrics, RequestTimingMiddleware
from api.routes import archive, compare, docs, health, jobs, score, search
from api.web import SecurityHeadersMiddleware
from retrieval.config import Settings
from retrieval.service import SpaceService
from retrieval.spaces import SpaceServices

logger = logging.getLogger(__name__)


def _warm_up(service: SpaceService) -> None:
    """Load the model and open the index in the background; requests needing them wait on its lock.

    Then ``gc.freeze()``: the objects made while loading (torch, the model, the index) leave the cyclic
    collector's reach, so a full collection during a request no longer walks them (it took ~130 ms
    now and then in a re-rank otherwise at 5 ms; bench/rerank.py, docs/benchmarks.md).
    """
    try:
        service.index  # noqa: B018 - loads encoder, space and index
        for warning in service.placeholder_warnings():
            logger.warning(warning)
        gc.collect()
        gc.freeze()
    except Exception:  # noqa: BLE001 - /readyz reports it; requests will raise the typed error
        logger.exception("model or index failed to load")


def create_app(settings: Settings | None = None, *, service: SpaceService | None = None) -> FastAPI:
    """Build the app. The database opens (and migrates) at start; the model loads in the background."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.service = service or SpaceService(settings)
        app.state.spaces = SpaceServices(app.state.service)
        app.state.metrics.attach(app.state.service)
        warm_up = threading.Thread(target=_warm_up, args=(app.state.service,), daemon=True, name="warm-up")
        warm_up.start()
        yield
        warm_up.join()  # never tear down under a model that is still being built
        app.state.spaces.close()
        app.state.service.close()

    app = FastAPI(
        title="medvae-retrieval",
        version="0.1.0",
        description="Similar-case search for radiology archives on MedVAE latents.",
        lifespan=lifespan,
        docs_url=None,  # served by api/routes/docs.py, behind the API key
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)

    metrics = Metrics()
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.api.max_request_bytes)
    app.add_middleware(RequestTimingMiddleware, metrics=metrics)
    app.add_middleware(SecurityHeadersMiddleware)

    for module in (health, search, compare, archive, jobs, score, docs):
        app.include_router(module.router)
    app.include_router(web.router)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    app.mount(docs.ASSETS_URL, StaticFiles(directory=docs.ASSETS_DIR), name="docs-assets")
    return app
