"""One settings object for the whole service (pydantic-settings, ``RETRIEVAL_`` prefix, ``.env``).

Library code never reads the environment itself: a :class:`Settings` instance is built once
(by the CLI or the API factory) and passed down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from retrieval.domain.architectures import model_dims

DEFAULT_ID_SECRET = "change-me-medvae-retrieval"


class Settings(BaseSettings):
    """Runtime configuration. Every field is also ``RETRIEVAL_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(
        env_prefix="RETRIEVAL_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
        protected_namespaces=(),
    )

    data_dir: Path = Field(Path("./data"), description="Directory holding the SQLite file and the indexes.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file `retrieval.db` in data_dir."
    )
    model: str = Field("medvae_8_4_2d", description="MedVAE model name.")
    weights: str = Field(
        "hub",
        description="`hub` (Hugging Face; a commit sha as hub_revision pins it), a local checkpoint path, `random` "
        "(seeded random MedVAE weights), or `fake` (a deterministic stand-in encoder for tests; not MedVAE).",
    )
    model_config_path: Path | None = Field(
        None, description="Optional YAML architecture config to go with a local checkpoint."
    )
    hub_repo: str = "stanfordmimi/MedVAE"
    hub_revision: str = Field(
        "main",
        description="Hub revision (a commit sha pins it); the resolved commit is recorded in the space.",
    )
    seed: int = Field(0, description="Seed for `random` weights.")
    input_size: int = Field(384, ge=32, le=4096, description="Square model input size in pixels.")
    volume_size: int = Field(
        128, ge=16, le=1024, description="3-D models: volumes are fitted into a cube of this edge (voxels)."
    )
    volume_roi: int = Field(
        64, ge=16, le=512, description="3-D models: sliding-window size; larger cubes are encoded window by window."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA and on CPUs with bf16 units, else fp32."
    )
    runtime: Literal["auto", "torch", "openvino"] = Field(
        "auto", description="2-D encoding on the CPU: auto = OpenVINO when installed (1.3-1.4x PyTorch, measured), else torch."
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the encoder; auto = on for CUDA (3.4x there), off on CPU."
    )
    batch_size: int = Field(8, ge=1, le=4096)
    decode_workers: int = Field(
        -1, ge=-1, le=64, description="Decode processes; -1 = one per spare core, 0 = in-process."
    )
    pooling: str = Field("spp:1,2,4", description="Pooling name with parameters, e.g. `spp:1,2,4`, `mean`.")
    id_secret: str = Field(DEFAULT_ID_SECRET, description="HMAC key for PatientID/AccessionNumber hashes.")
    max_image_pixels: int = Field(
        80_000_000, ge=1, description="Largest decoded pixel count (rows x cols x frames x samples)."
    )
    date_shift_days: int = Field(
        0, ge=0, le=3650,
        description="Shift DICOM StudyDate by a per-patient keyed offset within +-N days (0 = store dates as they are).",
    )
    overfetch: int = Field(4, ge=1, le=100, description="Search fetches k * overfetch images before grouping.")
    api_keys: str = Field("", description="Comma-separated API keys; when set, every route but /healthz needs one.")
    max_request_bytes: int = Field(64 * 2**20, ge=1024, description="Largest accepted request body (413 above).")
    url_fetch_timeout: float = Field(10.0, gt=0, le=120, description="Seconds allowed to fetch an image_url.")
    url_allow_hosts: str = Field(
        "", description="Comma-separated hosts an image_url may use even when they resolve to non-global addresses."
    )

    index_type: Literal["auto", "flat", "hnsw"] = Field(
        "auto", description="FAISS index: exact flat, HNSW, or auto (flat below hnsw_min_vectors)."
    )
    hnsw_min_vectors: int = Field(50_000, ge=1, description="auto: spaces with at least this many vectors use HNSW.")
    hnsw_m: int = Field(32, ge=4, le=128, description="HNSW graph degree.")
    hnsw_ef_search: int = Field(128, ge=8, le=4096, description="HNSW efSearch per query (recall vs speed).")
    ingest_quality: bool = Field(
        False, description="Score each ingested image's reconstruction (PSNR/SSIM); costs a decoder pass (~2.3x encode)."
    )
    ingest_roots: str = Field(
        "", description="Comma-separated server folders that API ingest jobs may read; empty = API ingest disabled."
    )
    job_heartbeat_seconds: float = Field(5.0, gt=0, le=600, description="How often a worker reports job progress.")
    job_stale_seconds: float = Field(
        60.0, gt=0, le=86400, description="A running job without a heartbeat this long is resumed by another worker."
    )
    query_batching: Literal["auto", "on", "off"] = Field(
        "auto", description="Micro-batch concurrent query encodes; auto = on for CUDA."
    )
    query_batch_wait_ms: float = Field(
        4.0, ge=0, le=1000, description="How long a query waits for others to share its encoder batch."
    )

    dicomweb_username: str = Field("", description="DICOMweb basic-auth user (with dicomweb_password).")
    dicomweb_password: SecretStr = Field(SecretStr(""), description="DICOMweb basic-auth password; never logged.")
    dicomweb_token: SecretStr = Field(SecretStr(""), description="DICOMweb bearer token; never logged.")
    dicomweb_retries: int = Field(3, ge=0, le=20, description="Retries per DICOMweb request (connection errors, 408, 429, 502-504).")
    dicomweb_backoff: float = Field(0.5, ge=0, le=60, description="Retry n waits backoff * 2^n seconds.")
    dicomweb_timeout: float = Field(30.0, gt=0, le=600, description="Seconds allowed per DICOMweb request.")
    dicomweb_fetch_workers: int = Field(4, ge=1, le=32, description="Concurrent WADO-RS instance fetches.")
    dicomweb_allowed_urls: str = Field(
        "", description="Comma-separated DICOMweb base URLs that API ingest jobs may sync from; empty = none."
    )

    @model_validator(mode="after")
    def _own_secret_on_shared_databases(self) -> Settings:
        """A shared (PostgreSQL) archive must not hash identifiers with the public placeholder key."""
        if (self.database_url or "").startswith("postgresql") and self.id_secret == DEFAULT_ID_SECRET:
            raise ValueError(
                "RETRIEVAL_ID_SECRET is the built-in placeholder: set your own secret before using PostgreSQL "
                "(PatientID hashes keyed with a public value can be reversed by trying IDs)"
            )
        return self

    @field_validator("weights")
    @classmethod
    def _weights_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("weights must be `hub`, `random`, `fake` or a checkpoint path")
        return value.strip()

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file inside ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'retrieval.db').resolve()}"

    @property
    def model_dims(self) -> int:
        """2 for the image models, 3 for the volume models (``medvae_*_3d``)."""
        return model_dims(self.model)

    @property
    def model_input_size(self) -> int:
        """Edge of the model's input: ``input_size`` (square images) or ``volume_size`` (cubes)."""
        return self.volume_size if self.model_dims == 3 else self.input_size

    @property
    def ingest_root_list(self) -> list[Path]:
        return [Path(root.strip()).expanduser().resolve() for root in self.ingest_roots.split(",") if root.strip()]

    @property
    def dicomweb_allowed_url_list(self) -> list[str]:
        return [url.strip().rstrip("/") for url in self.dicomweb_allowed_urls.split(",") if url.strip()]

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

    @property
    def spool_dir(self) -> Path:
        """Where files fetched from remote sources wait, per run, until they are decoded."""
        return self.data_dir / "spool"

    @property
    def index_dir(self) -> Path:
        """Directory where FAISS indexes and their sidecars live."""
        return self.data_dir / "index"
