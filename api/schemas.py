"""Request and response models of the HTTP API."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from retrieval.domain.architectures import ARCHITECTURES
from retrieval.domain.filters import UID_KEYS, Filters
from retrieval.errors import InvalidRequestError
from retrieval.query.results import ImageResult, StudyResult, StudySummary
from retrieval.query.search import DEFAULT_TEXT_WEIGHT, MAX_TEXT_CHARS


def inline_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its nested models written in place, for a route's ``openapi_extra``.

    pydantic puts nested models under ``$defs``; a schema pasted into the OpenAPI document would
    then point at components that do not exist there (ReDoc refuses such a document).
    """
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(item) for item in node] if isinstance(node, list) else node

    return resolve(schema)


class RequestModel(BaseModel):
    """A request body (or a part of one): an unknown field is a 422 naming it and the valid ones.

    A typo (``label`` for ``labels``, ``positive``) is never silently ignored: ignoring it would
    answer a different question than the one asked.
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(key) for key in data if key not in cls.model_fields)
            if unknown:
                raise ValueError(
                    f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(f'`{name}`' for name in unknown)}; "
                    f"valid: {', '.join(cls.model_fields)}"
                )
        return data


class SearchFilters(RequestModel):
    modality: list[str] | str | None = None
    body_part: list[str] | str | None = None
    view: list[str] | str | None = None
    laterality: list[str] | str | None = None
    patient_sex: list[str] | str | None = None
    labels: list[str] | str | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    age_from: float | None = Field(None, ge=0, le=200, description="Years, from DICOM PatientAge.")
    age_to: float | None = Field(None, ge=0, le=200)
    study_uid: list[str] | str | None = Field(None, description="StudyInstanceUID(s); any of.")
    series_uid: list[str] | str | None = Field(None, description="SeriesInstanceUID(s); any of.")
    sop_uid: list[str] | str | None = Field(None, description="SOPInstanceUID(s); any of.")
    min_psnr: float | None = None
    max_psnr: float | None = None
    min_ssim: float | None = None
    max_ssim: float | None = None

    def to_filters(self, min_score: float | None) -> Filters:
        filters = Filters(min_score=min_score, date_from=self.date_from, date_to=self.date_to,
                          age_from=self.age_from, age_to=self.age_to)
        filters.quality = {key: getattr(self, key) for key in ("min_psnr", "max_psnr", "min_ssim", "max_ssim")
                           if getattr(self, key) is not None}
        for key in ("modality", "body_part", "view", "laterality", "patient_sex", "labels", *UID_KEYS):
            value = getattr(self, key)
            if value:  # a list or a comma-separated string: "any of" (labels: "all of")
                filters.set(key, value if isinstance(value, str) else ",".join(value))
        return filters


MAX_ROW_ID = 2_147_483_647
#: a space key (sha256 hex) or a prefix of at least 8 of its characters
SPACE_KEY_PATTERN = r"^[0-9a-fA-F]{8,64}$"


class QueryImage(RequestModel):
    """The query image of a JSON request: at most one of the three (a multipart ``file`` is the fourth)."""

    image_base64: str | None = None
    image_url: str | None = None
    image_id: int | None = Field(None, ge=1, le=MAX_ROW_ID)

    @model_validator(mode="after")
    def _one_query_at_most(self) -> QueryImage:
        given = [name for name in ("image_base64", "image_url", "image_id") if getattr(self, name) not in (None, "")]
        if len(given) > 1:
            raise InvalidRequestError(f"give exactly one query, not {', '.join(given)}", detail={"fields": given})
        return self


class SearchParams(QueryImage):
    """Search parameters; a JSON request gives one of the three image fields, a ``text``, both (an image and a
    text), or ``positive`` examples."""

    k: int = Field(10, ge=1, le=1000)
    filters: SearchFilters = SearchFilters()
    min_score: float | None = Field(None, ge=-1.0, le=1.0)
    group_by: Literal["study", "image", "patient"] = Field(
        "study", description="One hit per study, per image, or per patient (images without a patient id: per study)."
    )
    exclude_same_patient: bool = False
    exclude_self: bool = Field(False, description="With image_id: leave the query image itself out of the results.")
    positive: list[int] = Field(
        default_factory=list, max_length=100,
        description="Relevance feedback: stored image ids the results should be more like (Rocchio; with or without "
        "a query image). Feedback images are left out of the results.",
    )
    negative: list[int] = Field(default_factory=list, max_length=100,
                                description="Stored image ids the results should be less like.")
    rerank: Literal["none", "latent"] = Field(
        "none", description="`latent`: re-score the ANN's top `rerank_depth` images with the whole stored latent "
        "(cosine of the stage-2 grid); needs a query image.",
    )
    rerank_depth: int = Field(100, ge=1, le=1000)
    text: str | None = Field(
        None, min_length=1, max_length=MAX_TEXT_CHARS,
        description="A text query (`right pleural effusion`) for a space with a text tower (pooling `biomedclip`); "
        "alone, or with a query image, combined as normalise((1 - text_weight) * image + text_weight * text).",
    )
    text_weight: float = Field(DEFAULT_TEXT_WEIGHT, ge=0.0, le=1.0, description="With an image and a text: the text's share.")
    previews: Literal["none", "url", "inline"] = "url"
    sort: Literal["score", "psnr", "ssim"] = "score"
    space: str | None = Field(
        None, pattern=SPACE_KEY_PATTERN,
        description="Space key (or its first 8+ characters) to search; default: the server's space.",
    )


class SimilarityParams(QueryImage):
    """A query image and a stored image to compare it with, cell by cell."""

    target_image_id: int = Field(..., ge=1, le=MAX_ROW_ID)


class SimilarityGrid(BaseModel):
    rows: int
    cols: int
    cells: list[list[float]]


class SimilarityResponse(BaseModel):
    target_image_id: int
    score: float
    grid: SimilarityGrid
    query_preview_png_base64: str
    target_preview_url: str
    weights: str
    note: str


class ServiceInfo(BaseModel):
    version: str
    model: str
    weights: str
    random_weights: bool = Field(..., description="True when the weights are not the trained ones: MedVAE's (random, "
                                 "or the fake test encoder) or, in a `biomedclip` space, BiomedCLIP's or its tokenizer.")
    warning: str | None = None
    text_search: bool = Field(False, description="True when the server's space has a text tower (pooling `biomedclip`).")
    space: dict[str, Any]
    max_request_bytes: int
    ingest_enabled: bool
    dicomweb_sources: list[str] = Field(default_factory=list, description="DICOMweb base URLs that ingest jobs may sync from.")


class ModelInfo(BaseModel):
    name: str
    weights: str
    weights_identity: str
    clip_weights: str | None = Field(None, description="Spaces with pooling `biomedclip`: BiomedCLIP's weights "
                                     "(`random-init` for random ones).")
    clip_weights_identity: str | None = None
    clip_tokenizer: str | None = Field(None, description="`generated-vocabulary` for the loud test vocabulary.")


class SearchResponse(BaseModel):
    model: ModelInfo
    space: dict[str, Any]
    query: dict[str, Any]
    group_by: str
    rerank: str = Field("none", description="`latent` when the top results were re-scored with the whole latents.")
    results: list[StudyResult]
    neighbour_labels: dict[str, float] = Field(
        default_factory=dict, description="Label frequencies among the returned images, weighted by score."
    )
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
    dims: int = Field(..., description="2 = images, 3 = volumes (one vector per series).")
    preprocessing: str
    pooling: str
    dim: int
    images: int
    active: bool


class ScoreInput(RequestModel):
    columns: list[str]
    index: list[Any] | None = Field(None, description="Row labels (Azure ML's pandas `split` form); ignored.")
    data: list[list[Any]] = Field(..., max_length=16)


class ScoreRequest(RequestModel):
    """The MedVAE endpoint card's request: ``columns = ["image_path", "decode"]``."""

    input_data: ScoreInput


class ScorePrediction(BaseModel):
    latent: list[Any]
    decoded: list[Any] | None = None


class ScoreResponse(BaseModel):
    predictions: list[ScorePrediction]
    weights: str


class IngestJobRequest(RequestModel):
    """A server-side folder or CSV manifest under the ingest roots, or an allow-listed DICOMweb source."""

    source: str = Field(
        ..., min_length=1, max_length=4096,
        description="Path on the server (under RETRIEVAL_INGEST_ROOTS), or dicomweb+http(s)://HOST:PORT/PATH"
        "[?since=YYYY-MM-DD&modality=CR,DX&study=UID] with a base URL in RETRIEVAL_DICOMWEB_ALLOWED_URLS.",
    )
    model: str | None = Field(
        None, max_length=64,
        description="MedVAE model to ingest with (e.g. medvae_4_1_3d for volumes); only workers running it take "
        "the job. Default: the server's model.",
    )

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str | None) -> str | None:
        if value is not None and value not in ARCHITECTURES:
            raise ValueError(f"unknown model {value!r}; choose one of: {', '.join(sorted(ARCHITECTURES))}")
        return value


class JobCounts(BaseModel):
    total: int
    ingested: int
    skipped: int
    failed: int


class JobFailure(BaseModel):
    source: str
    stage: str
    reason: str


class IngestJobInfo(BaseModel):
    job_id: str
    source: str
    model: str | None = Field(None, description="Workers running this model take the job (None: any).")
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    cancel_requested: bool
    attempts: int
    counts: JobCounts
    images_per_second: float
    message: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    heartbeat_at: str | None = None
    finished_at: str | None = None
    failures: list[JobFailure] | None = None
    weights: str = Field(..., description="Weights of the archive's space; `random-init` when random.")


class IngestJobList(BaseModel):
    jobs: list[IngestJobInfo]
    weights: str
