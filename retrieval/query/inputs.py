"""Decode a query (a file, a folder holding one DICOM series, or uploaded bytes) for the space it searches.

2-D spaces take any image file :mod:`retrieval.imaging.decode` reads; 3-D spaces take a NIfTI
file or a folder holding exactly one DICOM series (uploads: NIfTI only, a series is many files). A 2-D query fitted
on the encoder's device is decoded to its stored values (and a compressed DICOM frame decoded on that device when
the query codec is open), as ingest does (decisions 36, 39).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from retrieval.domain.metadata import from_dicom
from retrieval.errors import InvalidRequestError
from retrieval.imaging.decode import DecodedImage, decode_bytes, decode_path
from retrieval.imaging.device_codec import SYNTAXES, DeviceDecodeError
from retrieval.imaging.volumes import (
    Volume,
    is_nifti,
    load_volume,
    scan_volumes,
    volume_metadata,
)
from retrieval.service import SpaceService

logger = logging.getLogger(__name__)


def decode_query_file(service: SpaceService, path: str | Path) -> DecodedImage | Volume:
    """An image file (2-D space), or a NIfTI file / one-series folder (3-D space)."""
    if service.is_volume_space:
        return _query_volume(service, path)
    return _decoded_for(service, functools.partial(decode_path, path, max_pixels=service.settings.ingest.max_image_pixels))


def decode_query_bytes(service: SpaceService, data: bytes, name: str) -> DecodedImage | Volume:
    """Uploaded bytes: an image (2-D space) or a NIfTI volume (3-D space)."""
    if not service.is_volume_space:
        return _decoded_for(service, functools.partial(decode_bytes, data, name=name,
                                                       max_pixels=service.settings.ingest.max_image_pixels))
    suffix = ".nii.gz" if name.lower().endswith(".gz") or data[:2] == b"\x1f\x8b" else ".nii"
    if name and not is_nifti(name) and not name.lower().endswith(".gz"):
        raise InvalidRequestError(
            f"{name}: a 3-D space takes a NIfTI volume (.nii / .nii.gz) as the query, or a series id",
            detail={"field": "file"},
        )
    with tempfile.NamedTemporaryFile(suffix=suffix) as handle:
        handle.write(data)
        handle.flush()
        return _query_volume(service, handle.name)


def _decoded_for(service: SpaceService, decode: Callable[..., DecodedImage]) -> DecodedImage:
    """A 2-D query decoded for where :meth:`SpaceService.query_input` fits it: [0, 1] pixels for the CPU; for the
    encoder's device its stored values and their map, a compressed DICOM frame decoded there by the query codec
    when one is open (decision 39), or on the CPU when the codec refuses it."""
    if not service.fits_on_device(service.settings.query.fit_device):
        return decode()
    codec = service.query_codec
    decoded = decode(keep_stored_values=True, pass_encoded=SYNTAXES if codec is not None else frozenset())
    if decoded.encoded is None or codec is None:
        return decoded
    try:
        return replace(decoded, pixels=codec.decode(decoded.encoded), encoded=None)
    except DeviceDecodeError as exc:
        logger.info("query frame: %s; decoded on the CPU", exc)
        return decode(keep_stored_values=True)


def query_patient_hash(decoded: DecodedImage | Volume, secret: str) -> str | None:
    """The keyed PatientID hash of a DICOM query (image or series); ``None`` when it carries none."""
    if isinstance(decoded, Volume):
        return volume_metadata(decoded, secret=secret, date_shift_days=0).patient_hash
    if decoded.dicom is None:
        return None
    return from_dicom(decoded.dicom, secret=secret).patient_hash


def _query_volume(service: SpaceService, path: str | Path) -> Volume:
    """A query volume: a NIfTI file, or a folder holding exactly one DICOM series."""
    items = [item for item in scan_volumes(path) if not item.error]
    if len(items) != 1:
        raise InvalidRequestError(
            f"{path}: a volume query is one NIfTI file or a folder with exactly one DICOM series (found {len(items)})",
            detail={"field": "image"},
        )
    return load_volume(items[0], max_voxels=service.settings.ingest.max_image_pixels)
