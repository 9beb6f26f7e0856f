"""Build small DICOM files in tests (pydicom), with exactly the tags a case needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    SecondaryCaptureImageStorage,
    generate_uid,
)


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    with_pixels: bool = True,
    rows: int | None = None,
    columns: int | None = None,
    compression: str | None = None,
    **tags: object,
) -> Path:
    """Write a 16-bit unsigned grayscale DICOM; extra keyword arguments become tags. ``compression``:
    ``"jpeg2000-lossless"`` (pydicom's encoder, pylibjpeg-openjpeg) or ``"jpeg-lossless-sv1"`` (libjpeg-turbo
    through imagecodecs, which pydicom has no encoder for), one encapsulated fragment."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = tags.pop("StudyInstanceUID", generate_uid())
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = tags.pop("Modality", "CR")
    ds.Rows = rows if rows is not None else pixels.shape[0]
    ds.Columns = columns if columns is not None else pixels.shape[1]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for key, value in tags.items():
        setattr(ds, key, value)
    if with_pixels:
        ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    if compression == "jpeg2000-lossless":
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    elif compression == "jpeg-lossless-sv1":
        import imagecodecs

        frame = imagecodecs.jpeg8_encode(pixels.astype(np.uint16), lossless=True, predictor=1, bitspersample=16)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([bytes(frame)])
        ds["PixelData"].VR = "OB"
    elif compression is not None:
        raise ValueError(f"unknown compression {compression!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
