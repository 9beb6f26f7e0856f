"""``retrieval doctor``: the environment, weights, database and index state in one report."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

from retrieval.config import DEFAULT_ID_SECRET, Settings
from retrieval.errors import RetrievalError, reason_of
from retrieval.storage.index import Sidecar

PACKAGES = ("medvae-retrieval", "torch", "medvae", "faiss-cpu", "faiss-gpu-cu12", "sqlalchemy", "alembic", "pydicom", "pillow",
            "fastapi", "nvidia-nvimgcodec-cu13", "nvidia-nvimgcodec-cu12")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def diagnose(settings: Settings, *, load_model: bool = True) -> dict[str, Any]:
    """Collect the report; never raises: each failing part reports its error instead.

    Long but flat (over 60 lines): one guarded block per part of the report, in the order printed.
    """
    import torch

    from retrieval.model.encoder import cpu_has_bf16

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES if _version(name)},
        "device": {
            "setting": settings.model.device,
            "cuda_available": torch.cuda.is_available(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_bf16": cpu_has_bf16(),
            "torch_threads": torch.get_num_threads(),
        },
        "settings": {
            "data_dir": str(settings.storage.data_dir.resolve()),
            "model": settings.model.name,
            "weights": settings.model.weights,
            "input_size": settings.model.input_size,
            "pooling": settings.model.pooling,
            "batch_size": settings.model.batch_size,
            "id_secret_is_default": settings.privacy.id_secret == DEFAULT_ID_SECRET,
        },
    }
    from retrieval.service import SpaceService
    from retrieval.storage.database import current_revision
    from retrieval.storage.store import Store

    try:
        store = Store.open(settings)
        report["database"] = {
            "url": store.engine.url.render_as_string(hide_password=True),
            "revision": current_revision(store.engine),
            "counts": store.counts(),
        }
    except Exception as exc:  # noqa: BLE001 - doctor reports, never crashes
        report["database"] = {"error": reason_of(exc)}
        return _verdict(report, settings)
    if not load_model:
        store.close()
        return _verdict(report, settings)
    try:
        service = SpaceService(settings, store=store)
        encoder = service.encoder
        report["weights"] = {
            "kind": encoder.weights.kind,
            "identity": encoder.weights.identity,
            "random": encoder.weights.is_random,
            "not_medvae_weights": encoder.weights.is_placeholder,  # random or the fake test encoder
            # hub weights: the commit `hub_revision` resolved to (a branch such as `main` moves; a sha pins it)
            "hub_commit": encoder.weights.identity.split("@", 1)[1].split(":", 1)[0] if encoder.weights.kind == "hub" else None,
            "precision": encoder.precision_label,
            "device": str(encoder.device),
            # the compiled encoder (decision 34): None = not compiled, cold / warm, or unusable (it crashed a child)
            "compiled": encoder.compile_cache,
            # who decodes compressed DICOM frames at ingest (decision 39): "cpu", or "nvimgcodec <version>"
            "frame_decoder": _frame_decoder(service),
        }
        space = service.space
        count, top = store.vector_stats(space.id)
        sidecar = Sidecar.read(settings.storage.index_dir / f"{space.key}.json")
        report["index"] = {
            "space": service.space_info(),
            "database_vectors": count,
            "database_watermark": top,
            "sidecar": sidecar.__dict__ if sidecar else None,
            "consistent": bool(sidecar and sidecar.count == count and sidecar.watermark == top),
        }
        # every stored space, for `search --space` / the API's `space` (key prefix: pooling, images)
        report["spaces"] = {stored.key[:12]: f"{stored.model} {stored.pooling}, {store.vector_stats(stored.id)[0]} images"
                            for stored in store.list_spaces()}
    except RetrievalError as exc:
        report["weights"] = {"error": exc.message}
    finally:
        store.close()
    return _verdict(report, settings)


def _frame_decoder(service: Any) -> str:
    """``RETRIEVAL_INGEST_FRAME_DECODER`` as an ingest would resolve it with this encoder; a required codec that cannot
    start is the weights part's error (an ingest would refuse to start)."""
    ingest = service.settings.ingest
    codec = service.frame_codec(ingest.fit_device, ingest.frame_decoder)
    return f"nvimgcodec {codec.version}" if codec is not None else "cpu"


def _verdict(report: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Add ``problems`` (something is broken: ``retrieval doctor`` exits 1) and ``warnings`` (it works, but …)."""
    problems = [f"{part}: {report[part]['error']}" for part in ("database", "weights") if "error" in report.get(part, {})]
    index = report.get("index")
    if index is not None and not index["consistent"]:
        problems.append("index: the index files do not match the database (`retrieval reindex` rebuilds them)")
    warnings = []
    if settings.privacy.id_secret == DEFAULT_ID_SECRET:
        warnings.append("RETRIEVAL_ID_SECRET is the built-in placeholder: patient hashes can be reversed; set your own")
    revision = settings.model.hub_revision
    if settings.model.weights == "hub" and not (len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)):
        warnings.append(f"RETRIEVAL_HUB_REVISION={revision} is a branch, not a commit: set the commit sha "
                        f"(`hub_commit` above) to pin the weights")
    if report.get("weights", {}).get("compiled") == "unusable":
        warnings.append(f"the compiled encoder crashed a child process that built or loaded it, so it runs uncompiled "
                        f"(slower, the same vectors); {settings.storage.data_dir / 'compile-cache'} holds the verdict "
                        f"(*.probe): delete it to try again, e.g. after a PyTorch upgrade")
    if report.get("weights", {}).get("not_medvae_weights"):
        warnings.append(f"weights are not MedVAE's trained ones ({settings.model.weights}): similarity is not meaningful")
    report["problems"], report["warnings"] = problems, warnings
    return report
