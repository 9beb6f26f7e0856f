"""Ingest jobs over HTTP: the API records them, ``retrieval worker`` processes run them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from api.deps import ServiceDep, SettingsDep, require_api_key
from api.errors import error_responses
from api.schemas import IngestJobInfo, IngestJobList, IngestJobRequest
from retrieval.storage.jobs import JobQueue, allowed_job_source, job_json

router = APIRouter(prefix="/v1/ingest-jobs", tags=["ingest jobs"], dependencies=[Depends(require_api_key)])


def _queue(service: ServiceDep, settings: SettingsDep) -> JobQueue:
    return JobQueue(service.store, stale_seconds=settings.jobs.stale_seconds)


def _with_weights(body: dict[str, Any], service: ServiceDep) -> dict[str, Any]:
    """Every job response says which weights this archive's space uses (``random-init`` when random)."""
    return {**body, "weights": service.model_info()["weights"]}


@router.post(
    "",
    status_code=202,
    response_model=IngestJobInfo,
    responses=error_responses(400, 401, 403, 422),
    summary="Queue an ingest of a server-side folder or manifest, or a DICOMweb sync",
)
def submit_job(body: IngestJobRequest, service: ServiceDep, settings: SettingsDep) -> dict[str, Any]:
    """A folder or manifest must lie under one of ``RETRIEVAL_INGEST_ROOTS`` (symlinks resolved); a
    ``dicomweb+http(s)://`` source must name a base URL in ``RETRIEVAL_DICOMWEB_ALLOWED_URLS``. A worker runs it."""
    source = allowed_job_source(body.source, settings)
    return _with_weights(
        job_json(_queue(service, settings).submit(source, model=body.model or settings.model.name), failures=[]), service
    )


@router.get("", response_model=IngestJobList, responses=error_responses(401))
def list_jobs(
    service: ServiceDep, settings: SettingsDep, limit: int = Query(50, ge=1, le=500)
) -> dict[str, Any]:
    jobs = [_with_weights(job_json(job), service) for job in _queue(service, settings).recent(limit)]
    return {"jobs": jobs, "weights": service.model_info()["weights"]}


@router.get("/{job_id}", response_model=IngestJobInfo, responses=error_responses(401, 404))
def get_job(job_id: str, service: ServiceDep, settings: SettingsDep) -> dict[str, Any]:
    """State, counts, images/s and the failures (up to 200) with their reasons."""
    queue = _queue(service, settings)
    job = queue.get(job_id)
    return _with_weights(job_json(job, failures=queue.failures(job_id)), service)


@router.delete(
    "/{job_id}",
    response_model=IngestJobInfo,
    responses={**error_responses(401, 404, 409), 202: {"model": IngestJobInfo, "description": "cancel requested"}},
)
def cancel_job(job_id: str, service: ServiceDep, settings: SettingsDep) -> JSONResponse:
    """Cancel: a queued job at once (200); a running one after its current batch (202)."""
    job = _queue(service, settings).cancel(job_id)
    return JSONResponse(_with_weights(job_json(job), service), status_code=200 if job.state == "cancelled" else 202)
