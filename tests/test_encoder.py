from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_image
from conftest import tiny_settings as fake_settings

from retrieval.config import Settings
from retrieval.errors import ConfigurationError, WeightsError
from retrieval.model.encoder import MedVAEEncoder
from retrieval.model.network import fold_lora, save_state_dict, use_fused_attention


def tiny_settings(data_dir: Path, **overrides: object) -> Settings:
    """These tests are about MedVAE itself: seeded random weights unless a test says otherwise."""
    return fake_settings(data_dir, **{"weights": "random", **overrides})


def _batch(n: int = 2, size: int = 64) -> np.ndarray:
    from retrieval.imaging.preprocess import fit_to_square

    return np.stack([fit_to_square(synthetic_image(i, 80), size) for i in range(n)])


def test_encode_is_deterministic_and_shaped(encoder: MedVAEEncoder) -> None:
    pixels = _batch()
    z1, z2 = encoder.encode(pixels), encoder.encode(pixels)
    assert z1.shape == (2, 4, 8, 8) and z1.dtype == torch.float32
    assert torch.equal(z1, z2), "posterior mode on CPU fp32 must be bitwise repeatable"
    assert not torch.equal(z1[0], z1[1])


def test_lora_fold_and_fused_attention_match_medvae_module(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path)
    reference = MedVAEEncoder(settings, fold=False, fused_attention=False)  # medvae's own modules, as built
    fast = MedVAEEncoder(settings)
    lora_layers = [m for m in reference.model.modules() if hasattr(m, "lora_up")]
    assert lora_layers and any(m.lora_up.weight.abs().sum() > 0 for m in lora_layers), "LoRA must carry signal"
    assert not any(hasattr(m, "lora_up") for m in fast.model.modules())
    pixels = _batch(3)
    z_ref, z_fast = reference.encode(pixels), fast.encode(pixels)
    assert torch.allclose(z_ref, z_fast, rtol=1e-4, atol=1e-4), (z_ref - z_fast).abs().max()
    decoded_ref, decoded_fast = reference.decode(z_ref), fast.decode(z_ref)
    assert np.allclose(decoded_ref, decoded_fast, atol=1e-4)


def test_fold_lora_alone_is_exact_on_one_layer() -> None:
    from medvae.utils.lora import LoraInjectedConv2d

    torch.manual_seed(0)
    layer = LoraInjectedConv2d(8, 16, 3, padding=1, r=4).eval()
    torch.nn.init.normal_(layer.lora_up.weight, std=0.1)
    holder = torch.nn.Sequential(layer)
    x = torch.randn(2, 8, 12, 12)
    expected = holder(x)
    assert fold_lora(holder) == 1
    assert isinstance(holder[0], torch.nn.Conv2d)
    assert torch.allclose(holder(x), expected, atol=1e-5)


def test_fused_attention_equals_vanilla() -> None:
    from medvae.utils.vae.diffusionmodels import AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(64).eval()
    holder = torch.nn.Sequential(block)
    x = torch.randn(2, 64, 6, 6)
    expected = holder(x)
    assert use_fused_attention(holder) == 1
    assert torch.allclose(holder(x), expected, atol=1e-5)


def test_checkpoint_round_trip_gives_identical_latents(tmp_path: Path) -> None:
    random_encoder = MedVAEEncoder(tiny_settings(tmp_path), fold=False, fused_attention=False)
    checkpoint = tmp_path / "medvae.ckpt"
    save_state_dict(random_encoder.model, checkpoint)
    loaded = MedVAEEncoder(tiny_settings(tmp_path, weights=str(checkpoint)), fold=False, fused_attention=False)
    assert loaded.weights.kind == "checkpoint" and loaded.weights.identity.startswith("sha256:")
    assert not loaded.weights.is_random
    pixels = _batch()
    assert torch.equal(random_encoder.encode(pixels), loaded.encode(pixels))


def test_checkpoint_with_missing_keys_is_refused(tmp_path: Path) -> None:
    donor = MedVAEEncoder(tiny_settings(tmp_path), fold=False, fused_attention=False)
    state = donor.model.state_dict()
    state.pop("encoder.conv_in.weight")
    state.pop("encoder.down.0.block.0.conv1.lora_up.weight")
    checkpoint = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state}, checkpoint)
    with pytest.raises(WeightsError, match="missing 2 keys"):
        MedVAEEncoder(tiny_settings(tmp_path, weights=str(checkpoint)))


def test_missing_checkpoint_path_and_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not a file"):
        MedVAEEncoder(tiny_settings(tmp_path, weights=str(tmp_path / "nope.ckpt")))
    with pytest.raises(ConfigurationError, match="medvae_8_4_2d"):
        MedVAEEncoder(tiny_settings(tmp_path, model="medvae_9_9_2d"))


def test_hub_failure_is_an_error_never_a_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network in tests: the hub path must fail loudly
    with pytest.raises(WeightsError, match="Hugging Face hub"):
        MedVAEEncoder(tiny_settings(tmp_path, weights="hub"))


def test_decode_returns_unit_images(encoder: MedVAEEncoder) -> None:
    z = encoder.encode(_batch(1))
    image = encoder.decode(z)
    assert image.shape == (1, 64, 64) and image.min() >= 0.0 and image.max() <= 1.0


def test_s2_latent_matches_medvae_forward(encoder: MedVAEEncoder) -> None:
    pixels = _batch(1)
    z = encoder.encode(pixels)
    x = encoder.to_model_input(pixels)
    with torch.inference_mode():
        _, _, latent = encoder.model.compute_latent_proj(x, sample_posterior=False)
    assert torch.allclose(encoder.s2_latent(z), latent.float(), atol=1e-4)


def test_compiled_path_pads_and_splits_without_changing_results(encoder: MedVAEEncoder) -> None:
    pixels = np.concatenate([_batch(3), _batch(3)[::-1]])  # 6 images, batch_size is 4
    reference = encoder.encode(pixels)
    encoder.compiled = True  # exercise the fixed-shape path (pad 2 -> 4, split 6 -> 4 + 2) without compiling
    try:
        assert torch.equal(encoder.encode(pixels), reference)
        assert torch.equal(encoder.encode(pixels[:3]), reference[:3])
    finally:
        encoder.compiled = False


def test_openvino_runtime_equals_torch_and_caches_its_conversion(encoder: MedVAEEncoder, tmp_path: Path) -> None:
    pixels = np.stack([synthetic_image(seed, size=64) for seed in range(3)]).astype(np.float32)
    expected = encoder.encode(pixels)  # PyTorch fp32
    settings = tiny_settings(tmp_path / "data", runtime="openvino")
    openvino = MedVAEEncoder(settings)
    assert openvino.precision_label == "openvino-f32"
    z = openvino.encode(pixels)
    assert z.shape == expected.shape and z.dtype == torch.float32
    assert torch.allclose(z, expected, rtol=0, atol=1e-4 * float(expected.abs().max())), (z - expected).abs().max()
    assert torch.equal(z, openvino.encode(pixels))  # deterministic
    assert torch.equal(openvino.encode(pixels[1:2])[0], z[1])  # any batch size, same answer per image
    cached = sorted(p.name for p in (settings.storage.data_dir / "openvino").iterdir())
    assert len(cached) == 2 and cached[0].endswith(".bin") and cached[1].endswith(".xml")
    again = MedVAEEncoder(settings)  # reads the converted model instead of converting again
    assert torch.equal(again.encode(pixels), z)
    decoded, reference = openvino.decode(z), encoder.decode(z)  # previews: the decoder runs in OpenVINO too
    assert decoded.shape == reference.shape == (3, 64, 64)
    assert float(np.abs(decoded - reference).max()) < 1e-3, float(np.abs(decoded - reference).max())
    assert [p.name.split("-")[0] for p in sorted((settings.storage.data_dir / "openvino").glob("*.xml"))] == [
        "decoder", "encoder"]

    bf16 = MedVAEEncoder(tiny_settings(tmp_path / "data", runtime="openvino", precision="bf16"))
    assert bf16.precision_label == "openvino-bf16"
    relative = float((bf16.encode(pixels) - expected).abs().max() / expected.abs().max())
    assert relative < 5e-2, relative  # bf16 tolerance, as PyTorch's bf16 autocast


def test_bf16_weights_hold_the_encoder_in_bf16_and_stay_within_bf16_tolerance(encoder: MedVAEEncoder, tmp_path: Path) -> None:
    pixels = np.stack([synthetic_image(seed, size=64) for seed in range(3)]).astype(np.float32)
    expected = encoder.encode(pixels)  # PyTorch fp32
    held = MedVAEEncoder(tiny_settings(tmp_path, precision="bf16-weights", runtime="auto"))
    assert held.precision_label == "bf16-weights" and held.openvino is None  # auto picks PyTorch for bf16 weights
    assert {p.dtype for p in held.model.encoder.parameters()} == {p.dtype for p in held.model.quant_conv.parameters()} == {
        torch.bfloat16}
    assert {p.dtype for p in held.model.decoder.parameters()} == {p.dtype for p in held.model.channel_proj.parameters()} == {
        torch.float32}
    z = held.encode(pixels)
    assert z.dtype == torch.float32 and z.shape == expected.shape
    relative = float((z - expected).norm() / expected.norm())
    assert relative < 5e-2, relative  # bf16 tolerance, as PyTorch's bf16 autocast
    assert torch.equal(held.encode(pixels[1:2])[0], z[1])
    assert held.decode(z).shape == (3, 64, 64) and held.s2_latent(z).dtype == torch.float32
    with pytest.raises(ConfigurationError, match="precision auto, fp32 or bf16"):
        MedVAEEncoder(tiny_settings(tmp_path, precision="bf16-weights", runtime="openvino"))


def test_openvino_runtime_is_refused_where_it_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="2-D models on the CPU only"):
        MedVAEEncoder(tiny_settings(tmp_path, runtime="openvino", model="medvae_4_1_3d", volume_max_voxels=16**3))
    assert MedVAEEncoder(tiny_settings(tmp_path, runtime="auto", model="medvae_4_1_3d", volume_max_voxels=16**3)).openvino is None


@pytest.mark.parametrize(("model", "grid"), [("medvae_4_1_2d", 16), ("medvae_8_1_2d", 8)])
def test_one_channel_2d_models_ingest_and_search(model: str, grid: int, tmp_path: Path) -> None:
    """Issue 13.5: the 1-channel 2-D models (no LoRA) build as medvae builds them, ingest, find themselves,
    preview, export and run the evaluation harness (pooling study, re-ranking, feedback)."""
    from conftest import make_archive

    from retrieval.domain.evaluation import EvalItem
    from retrieval.ingest.pipeline import IngestPipeline
    from retrieval.ops.eval_archive import evaluate_archive, pooling_study
    from retrieval.ops.eval_refine import refinement_study
    from retrieval.query.search import run_search
    from retrieval.service import SpaceService

    service = SpaceService(tiny_settings(tmp_path / "data", model=model, runtime="torch", weights="random"))
    assert service.encoder.architecture.in_channels == 1 and not service.encoder.architecture.lora
    files = make_archive(tmp_path / "archive", studies=3, per_study=1)
    assert IngestPipeline(service).run(tmp_path / "archive").ingested == 3
    z = service.encoder.encode(np.stack([synthetic_image(5, size=64)]))
    assert z.shape == (1, 1, grid, grid)
    found = run_search(service, path=files[1], k=1)
    assert found["results"][0]["study"]["label"] == "study_1" and found["results"][0]["score"] > 0.9999
    assert service.vectors_of(z).shape == (1, service.space.dim)
    from retrieval.ops.export import export_latents
    from retrieval.query.previews import preview_png

    assert preview_png(service, 1).startswith(b"\x89PNG")  # decoded from the stored 1-channel z
    export_latents(service, tmp_path / "export", formats=("npz",), include_s2=True)
    shard = np.load(tmp_path / "export" / "latents-00000.npz")
    assert shard["z"].shape == (3, 1, grid, grid) and shard["s2"].shape[0] == 3

    items = [EvalItem(image_id=i, study_id=i, labels=frozenset({"a" if i % 2 else "b"})) for i in (1, 2, 3)]
    metrics = evaluate_archive(service, items, [1, 2], exclude_same_patient=False)
    assert set(metrics) == {"image", "study"} and 0.0 <= metrics["image"]["precision_at_k"]["1"] <= 1.0
    study = {row["pooling"]: row for row in pooling_study(service, items, ["mean", "spp:1,2"], [1],
                                                          exclude_same_patient=False)}
    assert study["mean"]["dim"] == 1 and study["spp:1,2"]["dim"] == 5  # one latent channel
    refined = refinement_study(service, items, [1], rounds=1)
    assert set(refined) >= {"plain", "rerank_latent", "feedback"} and len(refined["feedback"]) == 1


def test_medvaes_own_api_still_imports_after_the_light_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder registers the ``medvae`` package without its ``__init__`` (MONAI, polars: 5 s a process);
    ``from medvae import MVAE`` later in the same process runs it then. Its ``medvae_main`` is a stand-in here, so
    that the test does not pay for MONAI either."""
    import sys
    import types

    from retrieval.model import network

    stand_in = types.ModuleType("medvae.medvae_main")
    stand_in.MVAE = object()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "medvae", None)  # whatever was there is restored after the test
    del sys.modules["medvae"]
    monkeypatch.setitem(sys.modules, "medvae.medvae_main", stand_in)
    network._medvae_model_classes()
    package = sys.modules["medvae"]
    assert "MVAE" not in vars(package)  # __init__ not run by the encoder
    from medvae import MVAE

    assert MVAE is stand_in.MVAE and package.__all__ == ["MVAE"]
    with pytest.raises(ImportError, match="cannot import name 'nothing_here'"):
        from medvae import nothing_here  # noqa: F401
