"""Typed exceptions. Every failure the service reports derives from :class:`RetrievalError`.

Each class carries a stable machine-readable ``code`` and the HTTP status the API maps it to,
so that the CLI and the API report the same failure the same way.
"""

from __future__ import annotations

from typing import Any


class RetrievalError(Exception):
    """Base class: ``code`` names the failure, ``detail`` carries structured context."""

    code = "retrieval_error"
    http_status = 500

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}

    def to_dict(self) -> dict[str, Any]:
        """The one JSON error shape used everywhere."""
        return {"error": {"code": self.code, "message": self.message, "detail": self.detail}}


def reason_of(exc: BaseException) -> str:
    """A failure reason to record: our own message, or the exception's type and text."""
    return exc.message if isinstance(exc, RetrievalError) else f"{type(exc).__name__}: {exc}"


class ConfigurationError(RetrievalError):
    code = "configuration_error"
    http_status = 500


class ImageDecodeError(RetrievalError):
    """A file could not be read as an image (unsupported, corrupt, truncated)."""

    code = "image_decode_error"
    http_status = 422


class ImageTooLargeError(ImageDecodeError):
    """The declared pixel count exceeds the configured cap; pixels were never decoded."""

    code = "image_too_large"
    http_status = 422


class WeightsError(RetrievalError):
    """Model weights could not be obtained or do not match the architecture."""

    code = "weights_error"
    http_status = 503


class NotFoundError(RetrievalError):
    code = "not_found"
    http_status = 404


class InvalidRequestError(RetrievalError):
    code = "invalid_request"
    http_status = 400


class UnsupportedQueryError(InvalidRequestError):
    """A well-formed query this space cannot answer (a text query on a space without a text tower)."""

    code = "unsupported_query"
    http_status = 422


class IndexStateError(RetrievalError):
    """The on-disk index disagrees with the database in a way that cannot be repaired in place."""

    code = "index_state_error"
    http_status = 503


class ForbiddenError(RetrievalError):
    """The request is understood but not allowed (e.g. a path outside the allowed ingest roots)."""

    code = "forbidden"
    http_status = 403


class ConflictError(RetrievalError):
    """The request conflicts with the current state (e.g. cancelling a finished job)."""

    code = "conflict"
    http_status = 409


class PayloadTooLargeError(RetrievalError):
    """The request body is larger than the configured cap."""

    code = "payload_too_large"
    http_status = 413


class DatabaseUnavailableError(RetrievalError):
    """The database cannot be reached or opened (down, missing, refused the login); nothing was changed."""

    code = "database_unavailable"
    http_status = 503


class BusyError(RetrievalError):
    """The server is already doing as much of this as it allows at once; retry shortly."""

    code = "busy"
    http_status = 503


class SourceUnavailableError(RetrievalError):
    """A remote source (a DICOMweb server) refused us or could not be reached; nothing was stored."""

    code = "source_unavailable"
    http_status = 502


class ClusterUnavailableError(RetrievalError):
    """The Ray cluster of ``ingest --ray`` could not be joined or started; nothing was stored."""

    code = "cluster_unavailable"
    http_status = 503
