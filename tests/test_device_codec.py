"""Compressed DICOM frames passed on still encoded and decoded by the device's codec (decision 39).

nvImageCodec needs a CUDA driver even to start, so these tests put a stand-in in its place: a module with its
``Decoder`` / ``DecodeParams`` / ``ColorSpec`` that decodes JPEG 2000 with OpenJPEG (imagecodecs) on the CPU and
returns an array through DLPack, as nvImageCodec returns a GPU image. What is tested is ours: which frames are
passed on, the bytes passed, the mapping and fit of the decoded values, the fallback to the CPU when the codec
refuses a frame, and the report. nvImageCodec's own equality with pydicom is checked on the GPU machine
(bench/gpu_session.sh, step 6).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import imagecodecs
import numpy as np
import pytest
import torch
from conftest import synthetic_image
from dicom_factory import write_dicom

from retrieval.config import Settings
from retrieval.errors import ConfigurationError
from retrieval.imaging.decode import EncodedFrame, decode_path
from retrieval.imaging.device_codec import (
    SYNTAXES,
    DeviceDecodeError,
    DeviceFrameCodec,
    open_device_codec,
)
from retrieval.ingest.pipeline import IngestPipeline
from retrieval.service import SpaceService

J2K_MAGIC = b"\xff\x4f\xff\x51"  # a JPEG 2000 codestream's SOC + SIZ markers


class _StandInDecoder:
    """nvImageCodec's ``Decoder`` in shape: JPEG 2000 decoded (OpenJPEG), JPEG refused (None), as nvJPEG refuses a
    predictor it lacks; a damaged stream raises."""

    calls: list[bytes] = []
    batches: list[int] = []

    def __init__(self, device_id: int = -1) -> None:
        self.device_id = device_id

    def decode(self, streams: list[SimpleNamespace], params: Any = None) -> list[Any]:
        """A batch: an image or None for each code stream, as nvImageCodec's batch decode answers."""
        assert params.allow_any_depth and params.color_spec == "unchanged"
        _StandInDecoder.batches.append(len(streams))
        _StandInDecoder.calls.extend(stream.data for stream in streams)
        return [self._one(stream.data) for stream in streams]

    @staticmethod
    def _one(stream: bytes) -> Any:
        if not stream.startswith(J2K_MAGIC):
            return None
        try:
            return imagecodecs.jpeg2k_decode(stream)[..., None]  # (H, W, 1), as nvImageCodec's grayscale images
        except imagecodecs.Jpeg2kError:
            return None


STAND_IN = SimpleNamespace(
    __version__="stand-in", Decoder=_StandInDecoder, ColorSpec=SimpleNamespace(UNCHANGED="unchanged"),
    CodeStream=lambda data: SimpleNamespace(data=bytes(data)),
    DecodeParams=lambda allow_any_depth, color_spec: SimpleNamespace(allow_any_depth=allow_any_depth, color_spec=color_spec),
)


def _archive(root: Path) -> None:
    """Two windowed JPEG 2000 frames (MONOCHROME2, MONOCHROME1) for the codec, a JPEG Lossless one it refuses, a
    damaged JPEG 2000 one nobody decodes, and frames the workers keep decoding: uncompressed, no window, signed."""
    def stored(seed: int) -> np.ndarray:
        return (synthetic_image(seed, size=200) * 3500).astype(np.uint16)

    common = {"slope": 1, "intercept": -1024, "window": (700, 2600)}
    write_dicom(root / "j2k-mono2.dcm", stored(1), compression="jpeg2000-lossless", **common)
    write_dicom(root / "j2k-mono1.dcm", stored(2), compression="jpeg2000-lossless", photometric="MONOCHROME1", **common)
    write_dicom(root / "ljpeg.dcm", stored(3), compression="jpeg-lossless-sv1", **common)
    write_dicom(root / "raw.dcm", stored(4), **common)
    write_dicom(root / "j2k-no-window.dcm", stored(5), compression="jpeg2000-lossless")
    signed = write_dicom(root / "j2k-signed.dcm", stored(6) // 2, compression="jpeg2000-lossless", **common)
    damaged = write_dicom(root / "j2k-damaged.dcm", stored(7), compression="jpeg2000-lossless", **common)
    data = bytearray(damaged.read_bytes())
    start = data.find(J2K_MAGIC)
    data[start + 4 : start + 24] = bytes(20)  # the image header (SIZ): no decoder reads it, the DICOM header parses
    damaged.write_bytes(bytes(data))
    import pydicom

    dataset = pydicom.dcmread(signed)
    dataset.PixelRepresentation = 1
    dataset.save_as(signed)


@pytest.fixture()
def stand_in(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", STAND_IN)
    _StandInDecoder.calls, _StandInDecoder.batches = [], []
    return STAND_IN


def test_ingest_decodes_passed_on_frames_on_the_device_and_stores_what_the_workers_store(
        settings: Settings, tmp_path: Path, stand_in: SimpleNamespace) -> None:
    root = tmp_path / "files"
    _archive(root)
    vectors, reports = {}, {}
    for decoder, workers in (("cpu", 2), ("nvimgcodec", 2), ("nvimgcodec", 0)):
        service = SpaceService(settings.replaced(data_dir=tmp_path / f"{decoder}-{workers}", ingest_fit_device="encoder",
                                                 ingest_frame_decoder=decoder, decode_workers=workers))
        reports[decoder, workers] = report = IngestPipeline(service).run(root)
        assert (report.ingested, report.failed) == (6, 1), report.failures
        assert report.failures[0].source.endswith("j2k-damaged.dcm") and report.failures[0].stage == "decode"
        assert "cannot decode pixel data" in report.failures[0].reason  # pydicom's own error, from the CPU decode
        images = service.store.images_by_sha256([img.sha256 for chunk in service.store.iter_images() for img in chunk])
        matrix = service.store.vectors_of(service.space.id, [image.id for image in images])
        vectors[decoder, workers] = {Path(image.source_uri).name: row for image, row in zip(images, matrix, strict=True)}
        service.close()
    assert (reports["cpu", 2].codec_frames, reports["cpu", 2].codec_fallbacks) == (0, 0)
    for key in (("nvimgcodec", 2), ("nvimgcodec", 0)):
        report = reports[key]
        # the two windowed JPEG 2000 frames decoded by the codec; JPEG Lossless (refused) and the damaged frame
        # went back to the CPU; uncompressed, unwindowed and signed frames never reached the codec
        assert (report.codec_frames, report.codec_fallbacks) == (2, 2)
        # fitted on the device: those two, the JPEG Lossless frame decoded on the CPU after the refusal, and the
        # uncompressed and signed frames decoded by the workers (the unwindowed one is fitted by its worker)
        assert report.device_frames == reports["cpu", 2].device_frames == 5
        assert report.as_dict()["device_fit"]["device_decoded"] == 2
        assert vectors[key].keys() == vectors["cpu", 2].keys()
        for name, vector in vectors["cpu", 2].items():
            assert np.allclose(vectors[key][name], vector, atol=1e-5), name
    passed_on = {data[:2] for data in _StandInDecoder.calls}  # SOC (JPEG 2000), SOI (JPEG)
    assert len(_StandInDecoder.calls) == 2 * 4 and passed_on == {b"\xff\x4f", b"\xff\xd8"}
    assert max(_StandInDecoder.batches) == 3  # an encoder batch's passed-on frames (4 images a batch) in one call


def test_a_frame_is_passed_on_as_its_first_fragment_only_when_the_codec_can_take_it(tmp_path: Path) -> None:
    _archive(tmp_path)
    import pydicom
    from pydicom.encaps import get_frame

    for name, passed in (("j2k-mono2.dcm", True), ("j2k-mono1.dcm", True), ("ljpeg.dcm", True), ("raw.dcm", False),
                         ("j2k-no-window.dcm", False), ("j2k-signed.dcm", False)):
        decoded = decode_path(tmp_path / name, max_pixels=10**7, keep_stored_values=True, pass_encoded=SYNTAXES)
        assert (decoded.encoded is not None) == passed, name
        assert (decoded.pixels is None) == passed, name
        if passed:
            dataset = pydicom.dcmread(tmp_path / name)
            assert decoded.encoded.data == get_frame(dataset.PixelData, 0, number_of_frames=1)
            assert (decoded.encoded.rows, decoded.encoded.columns, decoded.encoded.bits_allocated) == (200, 200, 16)
            assert decoded.unit.kind == "window" and decoded.unit.invert == (name == "j2k-mono1.dcm")
            assert decoded.dicom is not None and "PixelData" not in decoded.dicom  # metadata still read
    # without keep_stored_values (the workers fit on the CPU) nothing is passed on
    assert decode_path(tmp_path / "j2k-mono2.dcm", max_pixels=10**7, pass_encoded=SYNTAXES).encoded is None


def test_the_codec_checks_what_it_returns_against_the_header(stand_in: SimpleNamespace, tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "f.dcm", (synthetic_image(9, size=60) * 3000).astype(np.uint16),
                       window=(1500, 3000), compression="jpeg2000-lossless")
    frame = decode_path(path, max_pixels=10**7, keep_stored_values=True, pass_encoded=SYNTAXES).encoded
    assert frame is not None
    codec = DeviceFrameCodec(stand_in, torch.device("cpu"))
    values = codec.decode(frame)
    assert values.dtype == torch.int32 and values.shape == (60, 60)
    import pydicom

    assert np.array_equal(values.numpy(), pydicom.dcmread(path).pixel_array)
    with pytest.raises(DeviceDecodeError, match="header declares 61x60"):
        codec.decode(EncodedFrame(frame.transfer_syntax, frame.data, 61, 60, 16, 16))
    with pytest.raises(DeviceDecodeError, match="could not decode"):
        codec.decode(EncodedFrame(frame.transfer_syntax, b"\xff\xd8 not a frame", 60, 60, 16, 16))
    results = codec.decode_batch([frame, EncodedFrame(frame.transfer_syntax, b"\xff\xd8", 60, 60, 16, 16), frame])
    assert [type(r).__name__ for r in results] == ["Tensor", "DeviceDecodeError", "Tensor"]

    def broken(streams: list[Any], params: Any = None) -> list[Any]:
        raise RuntimeError("nvjpeg2k: CUDA error")

    codec._decoder.decode = broken
    assert [str(r) for r in codec.decode_batch([frame, frame])] == ["nvImageCodec failed (RuntimeError: nvjpeg2k: CUDA error)"] * 2


def test_the_setting_chooses_the_codec_and_a_required_one_that_cannot_start_is_an_error(
        monkeypatch: pytest.MonkeyPatch, stand_in: SimpleNamespace) -> None:
    cpu = torch.device("cpu")
    assert open_device_codec("cpu", cpu) is None
    assert open_device_codec("auto", cpu) is None  # auto: a GPU encoder only
    assert isinstance(open_device_codec("nvimgcodec", cpu), DeviceFrameCodec)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # not installed: the import fails
    with pytest.raises(ConfigurationError, match="RETRIEVAL_INGEST_FRAME_DECODER=nvimgcodec") as caught:
        open_device_codec("nvimgcodec", cpu)
    assert "nvidia-nvimgcodec-cu13" in caught.value.message and caught.value.detail == {"setting": "RETRIEVAL_INGEST_FRAME_DECODER"}
    assert open_device_codec("auto", torch.device("cuda")) is None  # auto on a GPU without it: the workers decode


def test_doctor_names_who_decodes_compressed_frames(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                                    stand_in: SimpleNamespace) -> None:
    from retrieval.ops.doctor import diagnose

    assert diagnose(settings)["weights"]["frame_decoder"] == "cpu"  # auto, a CPU encoder
    required = settings.replaced(ingest_fit_device="encoder", ingest_frame_decoder="nvimgcodec")
    assert diagnose(required)["weights"]["frame_decoder"] == "nvimgcodec stand-in"
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)
    report = diagnose(required)
    assert any("RETRIEVAL_INGEST_FRAME_DECODER=nvimgcodec" in problem for problem in report["problems"])


def test_a_syntax_the_codec_refuses_from_the_start_goes_back_to_the_workers(
        settings: Settings, tmp_path: Path, stand_in: SimpleNamespace, caplog: pytest.LogCaptureFixture) -> None:
    """nvJPEG lacking the predictor of a whole JPEG Lossless archive must not leave one thread decoding every frame
    after a refusal: once the first frames of that syntax are all refused, the workers decode the rest."""
    from retrieval.ingest.pipeline import CODEC_REFUSALS_TO_GIVE_UP

    root = tmp_path / "files"
    for i in range(40):  # two chunks of submissions (32 a chunk)
        write_dicom(root / f"l{i:02d}.dcm", (synthetic_image(100 + i, size=80) * 3000).astype(np.uint16),
                    window=(1500, 3000), compression="jpeg-lossless-sv1")
    service = SpaceService(settings.replaced(ingest_fit_device="encoder", ingest_frame_decoder="nvimgcodec"))
    report = IngestPipeline(service).run(root)
    assert (report.ingested, report.failed, report.codec_frames) == (40, 0, 0)
    batch, lookahead = 4, 2 * 4 + 0  # tiny settings: batch 4, in-process decoding (0 workers)
    # the frames decoded before the first batch's refusals were seen, and those queued meanwhile, came passed on;
    # the queue's bound makes every later one the workers'
    assert CODEC_REFUSALS_TO_GIVE_UP <= report.codec_fallbacks <= CODEC_REFUSALS_TO_GIVE_UP + lookahead + batch
    assert len(_StandInDecoder.calls) == report.codec_fallbacks
    assert "refused the first 4 frames of transfer syntax 1.2.840.10008.1.2.4.70" in caplog.text
    service.close()


def test_a_compressed_dicom_query_is_decoded_by_the_query_codec_and_finds_what_the_cpu_finds(
        settings: Settings, tmp_path: Path, stand_in: SimpleNamespace) -> None:
    """RETRIEVAL_QUERY_FRAME_DECODER: an uploaded or named JPEG 2000 DICOM is decoded on the encoder's device; a JPEG
    Lossless one the codec refuses is decoded on the CPU; hits and scores equal those of the CPU fit."""
    from retrieval.query.search import run_search

    root = tmp_path / "files"
    _archive(root)
    (root / "j2k-damaged.dcm").unlink()
    service = SpaceService(settings)
    IngestPipeline(service).run(root)
    service.close()
    found = {}
    for fit, decoder in (("cpu", "cpu"), ("encoder", "cpu"), ("encoder", "nvimgcodec")):
        service = SpaceService(settings.replaced(query_fit_device=fit, query_frame_decoder=decoder))
        for name in ("j2k-mono1.dcm", "ljpeg.dcm"):
            by_path = run_search(service, path=root / name, k=3, group_by="image")["results"]
            uploaded = run_search(service, data=(root / name).read_bytes(), data_name=name, k=3, group_by="image")["results"]
            found[fit, decoder, name] = [[(r["images"][0]["image_id"], r["images"][0]["score"]) for r in hits]
                                         for hits in (by_path, uploaded)]
        service.close()
    assert len(_StandInDecoder.calls) == 2 * 2  # both J2K queries and both refused JPEG Lossless ones reached it
    for name in ("j2k-mono1.dcm", "ljpeg.dcm"):
        reference = found["cpu", "cpu", name][0]
        for key in (("cpu", "cpu", name), ("encoder", "cpu", name), ("encoder", "nvimgcodec", name)):
            for hits in found[key]:
                assert [i for i, _ in hits] == [i for i, _ in reference], key
                assert np.allclose([s for _, s in hits], [s for _, s in reference], atol=1e-5), key
