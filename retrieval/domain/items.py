"""What a source lists: one item to ingest (local file, DICOM series or remote instance), and how paths are shown."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SourceItem:
    """One thing to ingest, with what the source says about it."""

    path: str
    study: str | None = None
    row: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    #: remote items (DICOMweb): the URL stored and shown instead of the local spool path
    uri: str | None = None
    #: SOPInstanceUID when the source lists it before the file is read (skips stored instances unfetched)
    sop_uid: str | None = None
    #: (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) to fetch; ``path`` is the spool file once fetched
    remote: tuple[str, str, str] | None = None

    @property
    def display(self) -> str:
        """What failures and stored rows name: the remote URL, else the local path."""
        return self.uri or self.path


def printable_path(path: str | Path) -> str:
    """A path as text that any database and JSON accept: bytes that are not UTF-8 (a Latin-1 file
    name on a Linux share, kept by Python as surrogate escapes) become ``\\xNN``. Use it for what
    is stored or shown, never for opening the file."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


OUTSIDE_ROOTS = "outside the allowed ingest roots (after following links); not read"


def resolved_under(path: str | Path, roots: list[Path]) -> Path | None:
    """``path`` with links resolved when that lies in one of ``roots`` (themselves resolved), else None.

    A path that cannot be resolved (a link loop, a bad name) is outside too.
    """
    try:
        resolved = Path(path).expanduser().resolve()
    except (RuntimeError, OSError, ValueError):
        return None
    return resolved if any(resolved == root or resolved.is_relative_to(root) for root in roots) else None
