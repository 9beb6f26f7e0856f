"""One settings object for the whole service, in groups (pydantic-settings, ``RETRIEVAL_`` prefix, ``.env``).

Library code never reads the environment itself: a :class:`Settings` instance is built once
(by the CLI or the API factory) and passed down; each part reads its own group
(``settings.model.weights``, ``settings.dicomweb.retries``, …).

Every setting has one environment name, ``RETRIEVAL_<FLAT NAME>``: the group's prefix plus the
field name (``RETRIEVAL_DICOMWEB_RETRIES``), or the field's alias where the group's name would
only repeat it (``RETRIEVAL_MODEL`` is ``model.name``). Those names are the ones the service
has always had; :data:`FLAT_NAMES` lists them. ``Settings(...)`` and :meth:`Settings.replaced`
take the same flat names (``Settings(weights="fake", input_size=64)``) or whole groups.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from sqlalchemy.engine import make_url

from retrieval.domain.architectures import model_dims

DEFAULT_ID_SECRET = "change-me-medvae-retrieval"
ENV_PREFIX = "RETRIEVAL_"


class SettingsGroup(BaseModel):
    """A group of settings; ``env_prefix`` + field name (or the field's alias) is its flat name."""

    model_config = ConfigDict(frozen=True, validate_by_name=True, validate_by_alias=True, protected_namespaces=())
    env_prefix: ClassVar[str] = ""


class StorageSettings(SettingsGroup):
    """Where the archive lives: the SQL database, the FAISS indexes, the spool."""

    data_dir: Path = Field(Path("./data"), description="Directory holding the SQLite file and the indexes.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file `retrieval.db` in data_dir."
    )

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str | None) -> str | None:
        """PostgreSQL (``postgres://`` and ``postgresql://`` mean psycopg 3) or SQLite; anything else is refused."""
        if not value or not value.strip():
            return None
        value = value.strip()
        for prefix in ("postgres://", "postgresql://"):
            if value.startswith(prefix):
                value = "postgresql+psycopg://" + value.removeprefix(prefix)
        try:
            backend = make_url(value).get_backend_name()
        except Exception:  # noqa: BLE001 - SQLAlchemy raises ArgumentError and others on garbage
            raise ValueError("not a database URL; e.g. postgresql://user@host/db or sqlite:////path/retrieval.db") from None
        if backend not in ("postgresql", "sqlite"):
            raise ValueError(f"`{backend}` databases are not supported: use PostgreSQL or SQLite")
        return value

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file inside ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'retrieval.db').resolve()}"

    @property
    def location(self) -> str:
        """Where the archive is, for messages: the data dir, or the database URL with its password hidden."""
        if self.database_url is None:
            return f"the data dir {self.data_dir.resolve()}"
        return f"the database {make_url(self.database_url).render_as_string(hide_password=True)}"

    @property
    def spool_dir(self) -> Path:
        """Where files fetched from remote sources wait, per run, until they are decoded."""
        return self.data_dir / "spool"

    @property
    def index_dir(self) -> Path:
        """Directory where FAISS indexes and their sidecars live."""
        return self.data_dir / "index"


class ModelSettings(SettingsGroup):
    """Which MedVAE, with which weights, run how, and the head that turns its latent into a vector."""

    name: str = Field("medvae_8_4_2d", alias="model", description="MedVAE model name.")
    weights: str = Field(
        "hub",
        description="`hub` (Hugging Face; a commit sha as hub_revision pins it), a local checkpoint path, `random` "
        "(seeded random MedVAE weights), or `fake` (a deterministic stand-in encoder for tests; not MedVAE).",
    )
    config_path: Path | None = Field(
        None, alias="model_config_path", description="Optional YAML architecture config to go with a local checkpoint."
    )
    hub_repo: str = "stanfordmimi/MedVAE"
    hub_revision: str = Field(
        "main",
        description="Hub revision (a commit sha pins it); the resolved commit is recorded in the space.",
    )
    seed: int = Field(0, description="Seed for `random` weights.")
    input_size: int = Field(384, ge=32, le=4096, description="Square model input size in pixels.")
    volume_max_voxels: int = Field(2_097_152, ge=4096, le=2**31 - 1, description="3-D models: voxel budget of a "
        "volume's model input (default 128^3): native spacing (foreground-cropped, as medvae does) when it fits, else "
        "downsampled (antialiased). Part of the space.")
    volume_roi: int = Field(
        64, ge=16, le=512, description="3-D models: sliding-window size; larger volumes are encoded window by window."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "bf16-weights"] = Field(
        "auto", description="auto = bf16 autocast on CUDA and on CPUs with bf16 units, else fp32. bf16-weights: the "
        "encoder's weights and activations in bf16, no autocast (PyTorch runtime; the decoder keeps bf16 autocast)."
    )
    runtime: Literal["auto", "torch", "openvino"] = Field(
        "auto", description="2-D encoding on the CPU: auto = OpenVINO when installed (1.3-1.4x PyTorch, measured), else torch."
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="Compile the 2-D encoder ahead of time with AOTInductor, kept in data_dir/compile-cache and "
        "loaded by later starts; auto = on for CUDA (3.4x eager there), off on CPU (OpenVINO serves it)."
    )
    fit: Literal["stretch", "letterbox"] = Field(
        "stretch", description="2-D: how an image becomes the square input: `stretch` (as medvae was trained) or "
        "`letterbox` (aspect kept, zero padding). Part of the space.",
    )
    batch_size: int = Field(8, ge=1, le=4096)
    pooling: str = Field("spp:1,2,4", description="The space's head: a pooling with parameters (`spp:1,2,4`, `mean`) or "
                         "`biomedclip` (BiomedCLIP's image tower on the stage-2 latent, as MedVAE was trained; 2-D).")
    extra_poolings: str = Field("", alias="extra_poolings", description="More heads filled by the same ingest, "
                                "separated by spaces or `;` (e.g. `biomedclip`): the encoder runs once, the heads fan out.")

    @field_validator("weights")
    @classmethod
    def _weights_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("weights must be `hub`, `random`, `fake` or a checkpoint path")
        return value.strip()

    @property
    def dims(self) -> int:
        """2 for the image models, 3 for the volume models (``medvae_*_3d``)."""
        return model_dims(self.name)

    @property
    def extra_pooling_list(self) -> list[str]:
        """``extra_poolings`` split on spaces and ``;`` (pooling specs hold commas: ``spp:1,2,4``)."""
        return [part for part in self.extra_poolings.replace(";", " ").split() if part]

    @property
    def space_input_size(self) -> int:
        """A space's ``input_size``: the square's edge for images, the voxel budget for volumes."""
        return self.volume_max_voxels if self.dims == 3 else self.input_size


class ClipSettings(SettingsGroup):
    """BiomedCLIP, the semantic head (``pooling=biomedclip``): its weights and tokenizer, chosen like MedVAE's."""

    env_prefix: ClassVar[str] = "clip_"
    weights: str = Field("hub", description="`hub` (open_clip's hub checkpoint at clip_revision), a local folder "
                         "(open_clip_config.json + checkpoint) or checkpoint file, or `random` (seeded, exact architecture).")
    repo: str = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    revision: str = Field("main", description="Hub revision of the BiomedCLIP weights (a commit sha pins it).")
    seed: int = Field(0, description="Seed for `random` BiomedCLIP weights.")
    tokenizer: str = Field("auto", description="`auto` (the hub's PubMedBERT tokenizer, or the weights folder's; a "
                           "generated vocabulary with random weights), a tokenizer folder, or `generated` (loud).")


class IndexSettings(SettingsGroup):
    """The FAISS index of each space."""

    env_prefix: ClassVar[str] = "index_"
    type: Literal["auto", "flat", "hnsw", "ivfpq"] = Field(
        "auto", description="FAISS index: exact flat, HNSW, IVF-PQ with exact re-scoring, or auto (flat below "
        "hnsw_min_vectors, HNSW above, IVF-PQ where HNSW would exceed index_memory_mb)."
    )
    memory_mb: int = Field(8192, ge=1, le=2**24, description="auto: the memory one space's index may take in each "
                           "process that serves it; above it, IVF-PQ (product-quantised codes) instead of HNSW.")
    nprobe: int = Field(64, ge=1, le=65536, description="IVF-PQ: inverted lists visited per query (64: recall@10 0.97 at 1M, bench/search.py).")
    rescore: int = Field(0, ge=0, le=100_000, description="IVF-PQ: best candidates re-scored exactly with their "
                         "stored vectors per query; 0 = auto: 256 up to 1M vectors, doubled each time the space "
                         "quadruples (1024 at 10M).")
    hnsw_min_vectors: int = Field(
        50_000, ge=1, alias="hnsw_min_vectors", description="auto: spaces with at least this many vectors use HNSW."
    )
    hnsw_m: int = Field(32, ge=4, le=128, alias="hnsw_m", description="HNSW graph degree.")
    hnsw_ef_search: int = Field(
        128, ge=8, le=4096, alias="hnsw_ef_search", description="HNSW efSearch per query (recall vs speed)."
    )


class IngestSettings(SettingsGroup):
    """Reading and decoding sources."""

    decode_workers: int = Field(
        -1, ge=-1, le=64, description="Decode processes; -1 = one per spare core (at most 8 when encoding on the CPU), "
        "0 = in-process."
    )
    max_image_pixels: int = Field(
        80_000_000, ge=1, description="Largest decoded value count of an image: rows x cols x samples of the one frame decoded."
    )
    quality: bool = Field(
        False, alias="ingest_quality",
        description="Score each ingested image's reconstruction (PSNR/SSIM); costs a decoder pass (~2.3x encode).",
    )
    manifest_columns: str = Field(
        "", description="Comma-separated extra manifest columns to store with each image (e.g. `site,split`); "
        "other unknown columns are dropped, since they may hold identifiers.",
    )
    fit_device: Literal["auto", "cpu", "encoder"] = Field(
        "auto", alias="ingest_fit_device", description="Where ingest maps a 2-D image's stored values to [0, 1] "
        "(min-max, DICOM rescale and window) and resizes it: cpu (in the decode workers, Pillow), or on the "
        "encoder's device (torch; decode workers only read and unpack pixels, handed over in shared memory); "
        "auto = the encoder's when it is a GPU.",
    )
    frame_decoder: Literal["auto", "cpu", "nvimgcodec"] = Field(
        "auto", alias="ingest_frame_decoder", description="Who decodes a JPEG / JPEG 2000 / HTJ2K compressed DICOM "
        "frame (unsigned grayscale with a window) that is fitted on the encoder's device: cpu (the decode workers, "
        "pydicom), or nvimgcodec (nvImageCodec on the encoder's GPU; the workers pass the compressed frame on); "
        "auto = nvimgcodec when the encoder is a GPU and nvidia-nvimgcodec is installed.",
    )
    roots: str = Field(
        "", alias="ingest_roots",
        description="Comma-separated server folders that API ingest jobs may read; empty = API ingest disabled.",
    )

    @property
    def manifest_column_set(self) -> frozenset[str]:
        return frozenset(column.strip() for column in self.manifest_columns.split(",") if column.strip())

    @property
    def root_list(self) -> list[Path]:
        return [Path(root.strip()).expanduser().resolve() for root in self.roots.split(",") if root.strip()]


class PrivacySettings(SettingsGroup):
    """How identifiers and dates are kept out of the archive."""

    id_secret: str = Field(DEFAULT_ID_SECRET, description="HMAC key for PatientID/AccessionNumber hashes.")
    date_shift_days: int = Field(
        0, ge=0, le=3650,
        description="Shift DICOM StudyDate by a per-patient keyed offset within +-N days (0 = store dates as they are).",
    )


class QuerySettings(SettingsGroup):
    """How searches run."""

    overfetch: int = Field(4, ge=1, le=100, description="Search fetches k * overfetch images before grouping.")
    batching: Literal["auto", "on", "off"] = Field(
        "auto", alias="query_batching", description="Micro-batch concurrent query encodes; auto = on for CUDA."
    )
    batch_wait_ms: float = Field(
        4.0, ge=0, le=1000, alias="query_batch_wait_ms",
        description="How long a query waits for others to share its encoder batch.",
    )
    fit_device: Literal["auto", "cpu", "encoder"] = Field(
        "auto", alias="query_fit_device", description="Where a 2-D query image is resized and scaled to the model "
        "input: cpu (Pillow), or on the encoder's device (torch, equal within 2e-6; the upload is decoded to its "
        "stored values, mapped to [0, 1] there too); auto = the encoder's when it is a GPU.",
    )
    frame_decoder: Literal["auto", "cpu", "nvimgcodec"] = Field(
        "auto", alias="query_frame_decoder",
        description="RETRIEVAL_INGEST_FRAME_DECODER's choice for a query's compressed DICOM frame fitted on the device.",
    )


class ApiSettings(SettingsGroup):
    """The HTTP API's limits and keys."""

    keys: str = Field(
        "", alias="api_keys", description="Comma-separated API keys; when set, every route but /healthz needs one."
    )
    max_request_bytes: int = Field(64 * 2**20, ge=1024, description="Largest accepted request body (413 above).")
    url_fetch_timeout: float = Field(10.0, gt=0, le=120, description="Seconds allowed to fetch an image_url.")
    url_allow_hosts: str = Field(
        "", description="Comma-separated hosts an image_url may use even when they resolve to non-global addresses."
    )

    @property
    def key_list(self) -> list[str]:
        return [key.strip() for key in self.keys.split(",") if key.strip()]


class JobSettings(SettingsGroup):
    """Ingest jobs submitted through the API and run by workers."""

    env_prefix: ClassVar[str] = "job_"
    heartbeat_seconds: float = Field(5.0, gt=0, le=600, description="How often a worker reports job progress.")
    stale_seconds: float = Field(
        60.0, gt=0, le=86400, description="A running job without a heartbeat this long is resumed by another worker."
    )


class DicomwebSettings(SettingsGroup):
    """Syncing from a PACS over DICOMweb."""

    env_prefix: ClassVar[str] = "dicomweb_"
    username: str = Field("", description="DICOMweb basic-auth user (with dicomweb_password).")
    password: SecretStr = Field(SecretStr(""), description="DICOMweb basic-auth password; never logged.")
    token: SecretStr = Field(SecretStr(""), description="DICOMweb bearer token; never logged.")
    retries: int = Field(3, ge=0, le=20, description="Retries per DICOMweb request (connection errors, 408, 429, 502-504).")
    backoff: float = Field(0.5, ge=0, le=60, description="Retry n waits backoff * 2^n seconds.")
    timeout: float = Field(30.0, gt=0, le=600, description="Seconds allowed per DICOMweb request.")
    fetch_workers: int = Field(4, ge=1, le=32, description="Concurrent WADO-RS instance fetches.")
    allowed_urls: str = Field(
        "", description="Comma-separated DICOMweb base URLs that API ingest jobs may sync from; empty = none."
    )

    @property
    def allowed_url_list(self) -> list[str]:
        return [url.strip().rstrip("/") for url in self.allowed_urls.split(",") if url.strip()]


GROUPS: dict[str, type[SettingsGroup]] = {
    "storage": StorageSettings,
    "model": ModelSettings,
    "clip": ClipSettings,
    "index": IndexSettings,
    "ingest": IngestSettings,
    "privacy": PrivacySettings,
    "query": QuerySettings,
    "api": ApiSettings,
    "jobs": JobSettings,
    "dicomweb": DicomwebSettings,
}


def _flat_name(group: type[SettingsGroup], field: str, info: FieldInfo) -> str:
    return info.alias or f"{group.env_prefix}{field}"


FLAT_NAMES: dict[str, tuple[str, str]] = {
    _flat_name(group, field, info): (group_name, field)
    for group_name, group in GROUPS.items()
    for field, info in group.model_fields.items()
}
"""Flat name (the environment name without ``RETRIEVAL_``, lower case) -> (group, field)."""

RETIRED_NAMES: dict[str, str] = {  # settings that no longer exist -> what replaced them (said when one is still set)
    "volume_size": "RETRIEVAL_VOLUME_SIZE was retired on 2026-11-30: volumes keep their native spacing now "
    "(foreground-cropped, as medvae encodes them) up to RETRIEVAL_VOLUME_MAX_VOXELS voxels (default 2097152 = 128^3)"}


def nest_flat_names(values: dict[str, Any]) -> dict[str, Any]:
    """``{"dicomweb_retries": 5, "model": {...}}`` -> ``{"dicomweb": {"retries": 5}, "model": {...}}``.

    A key that is neither a flat name nor a group is refused (a typo is an error, never ignored).
    """
    nested: dict[str, dict[str, Any]] = {}
    groups = {key: value for key, value in values.items() if key in GROUPS and isinstance(value, dict | SettingsGroup)}
    for key, value in values.items():
        if key in groups:
            continue
        if key in RETIRED_NAMES:
            raise ValueError(RETIRED_NAMES[key])
        if key not in FLAT_NAMES:
            raise ValueError(f"unknown setting `{key}` (settings: {', '.join(sorted(FLAT_NAMES))})")
        group, field = FLAT_NAMES[key]
        nested.setdefault(group, {})[field] = value
    for key, value in groups.items():  # a whole group is only ever given as an argument: it wins over the environment
        nested.setdefault(key, {}).update(value.model_dump() if isinstance(value, SettingsGroup) else value)
    return nested


class _FlatEnvironment(PydanticBaseSettingsSource):
    """Reads each setting under its one name, ``RETRIEVAL_<FLAT NAME>``: the environment first, then ``.env``.

    Names are matched without regard to case; other ``RETRIEVAL_*`` variables are ignored, as
    pydantic-settings ignores them.
    """

    def __call__(self) -> dict[str, Any]:
        env_file = self.config.get("env_file")
        from_file = dotenv_values(env_file) if env_file and Path(env_file).is_file() else {}
        sources = [{k.upper(): v for k, v in os.environ.items()}, {k.upper(): v for k, v in from_file.items()}]
        found: dict[str, Any] = {}
        for flat in (*FLAT_NAMES, *RETIRED_NAMES):  # a retired one is refused, with its reason, by nest_flat_names
            name = f"{ENV_PREFIX}{flat}".upper()
            value = next((source[name] for source in sources if source.get(name) is not None), None)
            if value is not None:
                found[flat] = value
        return found

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        """Unused: :meth:`__call__` reads every flat name at once."""
        return None, field_name, False


class Settings(BaseSettings):
    """Runtime configuration in groups; every setting is also ``RETRIEVAL_<FLAT NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", frozen=True, protected_namespaces=())

    storage: StorageSettings = Field(default_factory=StorageSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    clip: ClipSettings = Field(default_factory=ClipSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    query: QuerySettings = Field(default_factory=QuerySettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    dicomweb: DicomwebSettings = Field(default_factory=DicomwebSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments first, then ``RETRIEVAL_<FLAT NAME>`` from the environment and ``.env``."""
        return init_settings, _FlatEnvironment(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        return nest_flat_names(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _own_secret_on_shared_databases(self) -> Settings:
        """A shared (PostgreSQL) archive must not hash identifiers with the public placeholder key."""
        if (self.storage.database_url or "").startswith("postgresql") and self.privacy.id_secret == DEFAULT_ID_SECRET:
            raise ValueError(
                "RETRIEVAL_ID_SECRET is the built-in placeholder: set your own secret before using PostgreSQL "
                "(PatientID hashes keyed with a public value can be reversed by trying IDs)"
            )
        return self

    def replaced(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (flat names or groups) applied and validated; the environment is not read again."""
        data: dict[str, Any] = {name: getattr(self, name).model_dump() for name in GROUPS}
        for group, fields in nest_flat_names(changes).items():
            data[group] = {**data[group], **fields}
        return type(self).model_validate(data)

