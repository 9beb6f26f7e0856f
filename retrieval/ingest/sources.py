"""List what an ingest source holds: a folder (recursive) or a CSV manifest.

Contract: :func:`scan` yields :class:`SourceItem` lazily and never raises for a bad *item*; items
that cannot even be listed (a manifest row without a path) come back with ``error`` set so the
pipeline records them as failures. A source that cannot be read at all raises
:class:`~retrieval.errors.InvalidRequestError` naming it.

* Folder: every file whose suffix is an image suffix, or that has no suffix (DICOM files from a
  PACS export often have none). Symbolic links to directories are not followed (no loops);
  hidden files and folders are skipped. Sorted, so runs are reproducible.
* Manifest (``.csv``): column ``path`` (relative paths are relative to the manifest's folder),
  optional ``study`` and ``labels`` (``|`` or ``;`` separated) and the other columns of the row, which
  :func:`~retrieval.domain.metadata.merge_manifest_row` stores or drops.
* With ``roots`` (API ingest jobs): every item must resolve, links followed, to a path under one
  of the roots (a folder entry linking elsewhere, a manifest row with ``../`` or an absolute
  path); one that does not comes back with ``error`` set and is never read. Items that pass carry
  their resolved path, so a link swapped after the check is not followed.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from retrieval.domain.items import OUTSIDE_ROOTS, SourceItem, resolved_under
from retrieval.errors import InvalidRequestError
from retrieval.imaging.decode import IMAGE_SUFFIXES


def scan(source: str | Path, *, roots: list[Path] | None = None) -> Iterator[SourceItem]:
    """Items of a folder or a ``.csv`` manifest; with ``roots``, confined to them (see above)."""
    path = Path(source).expanduser()
    if path.is_dir():
        yield from confined(_scan_folder(path), roots)
    elif path.is_file() and path.suffix.lower() == ".csv":
        yield from confined(_scan_manifest(path), roots)
    elif path.exists():
        raise InvalidRequestError(
            f"{path}: not a folder or a .csv manifest", detail={"field": "source", "value": str(path)}
        )
    else:
        raise InvalidRequestError(f"{path}: no such file or folder", detail={"field": "source", "value": str(path)})


def confined(items: Iterable[SourceItem], roots: list[Path] | None) -> Iterator[SourceItem]:
    """``items`` as they are without ``roots``; else each resolved under a root, or failed with the reason."""
    for item in items:
        if roots is None or item.error:
            yield item
            continue
        inside = resolved_under(item.path, roots)
        if inside is None:
            item.error = OUTSIDE_ROOTS
        else:
            item.path = str(inside)
        yield item


def _scan_folder(root: Path) -> Iterator[SourceItem]:
    def on_error(exc: OSError) -> None:
        pending_errors.append(SourceItem(path=str(exc.filename), error=f"cannot list folder: {exc.strerror}"))

    pending_errors: list[SourceItem] = []
    for directory, subdirs, files in os.walk(root, onerror=on_error, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        yield from pending_errors
        pending_errors.clear()
        for name in sorted(files):
            if name.startswith("."):
                continue
            suffix = Path(name).suffix.lower()
            if suffix and suffix not in IMAGE_SUFFIXES:
                continue
            yield SourceItem(path=os.path.join(directory, name))
    yield from pending_errors


def _scan_manifest(manifest: Path) -> Iterator[SourceItem]:
    try:
        handle = manifest.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise InvalidRequestError(f"{manifest}: cannot open manifest ({exc.strerror})") from exc
    with handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in columns:
            raise InvalidRequestError(
                f"{manifest}: manifest needs a `path` column (found: {', '.join(columns) or 'none'})",
                detail={"field": "path", "columns": columns},
            )
        base = manifest.parent
        for line_number, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v if isinstance(v, str) else "") for k, v in raw.items() if k}
            value = (row.get("path") or "").strip()
            if not value:
                yield SourceItem(path=f"{manifest}:{line_number}", error="manifest row has an empty `path`")
                continue
            path = Path(value).expanduser()
            if not path.is_absolute():
                path = base / path
            study = (row.get("study") or "").strip() or None
            yield SourceItem(path=str(path), study=study, row=row)
