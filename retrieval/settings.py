"""One settings object for the whole service (pydantic-settings, ``RETRIEVAL_`` prefix, ``.env``).

Library code never reads the environment itself: a :class:`Settings` instance is built once
(by the CLI or the API factory) and passed down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
        description="`hub` (Hugging Face, pinned revision), a local checkpoint path, or `random`.",
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
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA and on CPUs with bf16 units, else fp32."
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
    overfetch: int = Field(4, ge=1, le=100, description="Search fetches k * overfetch images before grouping.")
    api_keys: str = Field("", description="Comma-separated API keys; when set, every route but /healthz needs one.")
    max_request_bytes: int = Field(64 * 2**20, ge=1024, description="Largest accepted request body (413 above).")
    url_fetch_timeout: float = Field(10.0, gt=0, le=120, description="Seconds allowed to fetch an image_url.")
    url_allow_hosts: str = Field(
        "", description="Comma-separated hosts an image_url may use even when they resolve to non-global addresses."
    )

    @field_validator("weights")
    @classmethod
    def _weights_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("weights must be `hub`, `random` or a checkpoint path")
        return value.strip()

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file inside ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'retrieval.db').resolve()}"

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

    @property
    def index_dir(self) -> Path:
        """Directory where FAISS indexes and their sidecars live."""
        return self.data_dir / "index"

    @property
    def uses_random_weights(self) -> bool:
        return self.weights == "random"
