"""Request and response models of the HTTP API."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from retrieval.errors import InvalidRequestError
from retrieval.search import Filters


class SearchFilters(BaseModel):
    modality: list[str] | str | None = None
    body_part: list[str] | str | None = None
    view: list[str] | str | None = None
    laterality: list[str] | str | None = None
    labels: list[str] | str | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None

    def to_filters(self, min_score: float | None) -> Filters:
        filters = Filters(min_score=min_score, date_from=self.date_from, date_to=self.date_to)
        for key in ("modality", "body_part", "view", "laterality"):
            value = getattr(self, key)
            if value:
                filters.set(key, value if isinstance(value, str) else ",".join(value))
        if self.labels:
            filters.set("labels", self.labels if isinstance(self.labels, str) else ",".join(self.labels))
        return filters


class SearchParams(BaseModel):
    """Search parameters; for JSON requests exactly one of the three query fields is required."""

    image_base64: str | None = None
    image_url: str | None = None
    image_id: int | None = Field(None, ge=1)
    k: int = Field(10, ge=1, le=1000)
    filters: SearchFilters = SearchFilters()
    min_score: float | None = Field(None, ge=-1.0, le=1.0)
    group_by: Literal["study", "image"] = "study"
    exclude_same_patient: bool = False
    previews: Literal["none", "url", "inline"] = "url"

    @model_validator(mode="after")
    def _one_query_at_most(self) -> SearchParams:
        given = [name for name in ("image_base64", "image_url", "image_id") if getattr(self, name) not in (None, "")]
        if len(given) > 1:
            raise InvalidRequestError(f"give exactly one query, not {', '.join(given)}", detail={"fields": given})
        return self


class ImageResult(BaseModel):
    image_id: int
    source: str
    score: float | None = None
    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    laterality: str | None = None
    study_date: str | None = None
    width: int
    height: int
    labels: list[str] = []
    preview_url: str | None = None
    preview_png_base64: str | None = None


class StudySummary(BaseModel):
    study_id: int
    study_key: str
    label: str
    study_uid: str | None = None
    study_date: str | None = None


class StudyResult(BaseModel):
    study: StudySummary
    score: float
    images: list[ImageResult]


class ModelInfo(BaseModel):
    name: str
    weights: str
    weights_identity: str


class SearchResponse(BaseModel):
    model: ModelInfo
    space: dict[str, Any]
    query: dict[str, Any]
    group_by: str
    results: list[StudyResult]
    warnings: list[str] = []
    took_ms: float


class StudyDetail(BaseModel):
    study: StudySummary
    images: list[ImageResult]
    weights: str


class ImageDetail(ImageResult):
    study: StudySummary
    frames: int
    kind: str
    weights: str


class SpaceInfo(BaseModel):
    key: str
    model: str
    weights: str
    input_size: int
    preprocessing: str
    pooling: str
    dim: int
    images: int
    active: bool


class ScoreInput(BaseModel):
    columns: list[str]
    data: list[list[Any]] = Field(..., max_length=16)


class ScoreRequest(BaseModel):
    """The MedVAE endpoint card's request: ``columns = ["image_path", "decode"]``."""

    input_data: ScoreInput


class ScorePrediction(BaseModel):
    latent: list[Any]
    decoded: list[Any] | None = None


class ScoreResponse(BaseModel):
    predictions: list[ScorePrediction]
    weights: str
