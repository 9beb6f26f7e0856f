"""Issue 14: the BiomedCLIP space on the stored stage-2 latent, text queries and zero-shot labels.

BiomedCLIP runs with seeded random weights of its exact architecture and a generated vocabulary
(the hub is unreachable here); MedVAE is the fake test encoder, so the head is what is tested.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import run_cli
from conftest import make_archive, tiny_settings
from fastapi.testclient import TestClient
from live_server import tiny_env

from api.main import create_app
from retrieval.config import ClipSettings
from retrieval.errors import ConflictError, WeightsError
from retrieval.ingest.pipeline import IngestPipeline
from retrieval.model.biomedclip import (
    CLIP_MEAN,
    CLIP_STD,
    LATENT_SCALE,
    BiomedClip,
    image_clip_input,
    latent_clip_input,
    load_clip,
)
from retrieval.model.clip_weights import (
    BUNDLED_CONFIG,
    CLIP_RANDOM_WARNING,
    resolve_clip,
    write_generated_tokenizer,
)
from retrieval.service import SpaceService
from retrieval.spaces import SpaceServices

RANDOM_CLIP = ClipSettings(weights="random")


@pytest.fixture(scope="module")
def clip() -> BiomedClip:
    return load_clip(RANDOM_CLIP, torch.device("cpu"))


def _normalised(values: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (values - mean) / std


def test_the_latent_reaches_biomedclip_exactly_as_medvaes_stage2_loss_sends_it(clip: BiomedClip) -> None:
    """BiomedClipLoss (2-D): s2 / 4.6 -> mean over channels -> 3 channels -> Resize(224, bicubic, antialias) ->
    CenterCrop(224) -> Normalize(CLIP mean/std) -> encode_image; each step checked on its own."""
    # 1. the scale and 2. the channel mean: constant channels a, b, c, d give (a+b+c+d)/4/4.6 everywhere
    constant = torch.stack([torch.full((48, 48), value) for value in (0.5, -1.0, 2.0, 3.1)])[None]
    expected = (0.5 - 1.0 + 2.0 + 3.1) / 4 / LATENT_SCALE
    out = latent_clip_input(constant)
    assert out.shape == (1, 3, 224, 224)
    for channel in range(3):  # 4. Normalize with CLIP's mean and std, per channel
        assert torch.allclose(out[0, channel], torch.full((224, 224), (expected - CLIP_MEAN[channel]) / CLIP_STD[channel]),
                              atol=1e-5)
    # 3. three identical channels and 5. the resize: bicubic, antialiased, to 224 (square, so the crop keeps all)
    s2 = torch.randn(2, 4, 48, 48)
    grey = F.interpolate((s2 / LATENT_SCALE).mean(1, keepdim=True), size=(224, 224), mode="bicubic", antialias=True,
                         align_corners=False)
    manual = _normalised(grey.expand(-1, 3, -1, -1))
    assert torch.allclose(latent_clip_input(s2), manual, atol=1e-5)
    # 6. the vector: BiomedCLIP's image tower on that input, L2-normalised
    with torch.inference_mode():
        reference = F.normalize(clip.model.encode_image(manual), dim=-1).numpy()
    vectors = clip.embed_latents(s2)
    assert vectors.shape == (2, 512) and np.allclose(vectors, reference, atol=1e-5)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # text: the padding to open_clip's 256-token context is cut (masked out of attention: the same embedding)
    texts = ["right pleural effusion", "a chest x ray with a small nodule in the left upper lobe"]
    with torch.inference_mode():
        padded = F.normalize(clip.model.encode_text(clip.tokenizer(texts)), dim=-1).numpy()
    assert clip.tokenizer(texts).shape == (2, 256) and np.allclose(clip.embed_texts(texts), padded, atol=1e-5)
    # the loss's other side: the image x in [-1, 1] -> clamp((x + 1) / 2) -> 3 channels -> T
    x = torch.rand(1, 1, 96, 96) * 2.4 - 1.2
    image = F.interpolate(((x + 1) / 2).clamp(0, 1), size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(image_clip_input(x), _normalised(image.expand(-1, 3, -1, -1)), atol=1e-5)


def test_random_weights_build_the_exact_architecture_offline(clip: BiomedClip) -> None:
    """ViT-B/16 at 224 image tower, PubMedBERT text tower (no pooler: BiomedCLIP pools the CLS token), MLP text
    projection, 512-d, context length 256, seeded (same seed, same weights), loud."""
    visual = clip.model.visual.trunk
    assert visual.patch_embed.patch_size == (16, 16) and visual.patch_embed.img_size == (224, 224)
    assert len(visual.blocks) == 12 and visual.embed_dim == 768
    text = clip.model.text
    bert = text.transformer
    assert type(bert).__name__ == "BertModel" and bert.pooler is None
    assert (bert.config.num_hidden_layers, bert.config.hidden_size, bert.config.vocab_size) == (12, 768, 30522)
    assert [layer.out_features for layer in text.proj if hasattr(layer, "out_features")] == [640, 512]
    assert clip.tokenizer(["a chest x ray"]).shape == (1, 256)
    assert sum(p.numel() for p in clip.model.parameters()) == 195_902_721
    assert clip.source.identity == "random-init:seed=0" and CLIP_RANDOM_WARNING in clip.source.warnings()
    other_seed = resolve_clip(ClipSettings(weights="random", seed=1))
    assert other_seed.identity == "random-init:seed=1"


def test_clip_weights_from_a_folder_and_architectures_that_differ_are_refused(clip: BiomedClip, tmp_path: Path) -> None:
    folder = tmp_path / "biomedclip"
    write_generated_tokenizer(folder)
    shutil.copy(BUNDLED_CONFIG, folder / "open_clip_config.json")
    state = {key: value.half() for key, value in clip.model.state_dict().items()}  # fp16: half the test's disk
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    source = resolve_clip(ClipSettings(weights=str(folder)))
    assert source.kind == "path" and source.identity.startswith("sha256:") and source.tokenizer == folder.resolve()
    loaded = BiomedClip(source, torch.device("cpu"))
    loaded_state = loaded.model.state_dict()
    for key in ("logit_scale", "visual.trunk.blocks.11.mlp.fc2.weight", "text.transformer.encoder.layer.5.output.dense.weight",
                "text.proj.2.weight"):
        assert torch.equal(loaded_state[key], state[key].float()), key
    assert not loaded.source.warnings()  # neither random nor a generated vocabulary
    config = json.loads(BUNDLED_CONFIG.read_text())
    config["model_cfg"]["embed_dim"] = 256
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"model_cfg\.embed_dim: 256 \(BiomedCLIP: 512\)"):
        resolve_clip(ClipSettings(weights=str(folder)))
    with pytest.raises(WeightsError, match="neither a folder nor a file"):
        resolve_clip(ClipSettings(weights=str(tmp_path / "missing")))


def test_hub_weights_offline_say_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match="RETRIEVAL_CLIP_WEIGHTS to a local folder") as raised:
        resolve_clip(ClipSettings(weights="hub", revision="main"))
    assert raised.value.detail["field"] == "clip_weights"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("semantic")
    make_archive(root / "archive", studies=3, per_study=2)
    return root


def test_one_encode_fills_several_spaces(archive: Path, tmp_path: Path) -> None:
    """extra_poolings: the encoder runs once per batch; spp and biomedclip get the same images, in one transaction;
    reindexing biomedclip from stored z gives the same vectors (the head over the stored latent)."""
    settings = tiny_settings(tmp_path / "data", extra_poolings="biomedclip", clip_weights="random")
    service = SpaceService(settings)
    calls = []
    encode = service.encoder.encode
    service.encoder.encode = lambda pixels: calls.append(len(pixels)) or encode(pixels)  # type: ignore[method-assign]
    report = IngestPipeline(service).run(archive / "archive")
    assert report.ingested == 6 and calls == [4, 2]  # batch_size 4: two encoder calls for both spaces
    (semantic, spec), = service.extra_spaces
    assert semantic.pooling == "biomedclip[random-init:seed=0]" and semantic.dim == 512
    ids = sorted(row.image_id for chunk in service.store.vectors_after(semantic.id) for row in chunk)
    assert ids == sorted(row.image_id for chunk in service.store.vectors_after(service.space.id) for row in chunk)
    stored = service.store.vectors_of(semantic.id, ids)
    from_z = service.pooled([service.store.latent(i, service.space.encoder_key) for i in ids], spec)
    assert np.all(np.sum(stored * from_z, axis=1) > 0.999)  # z is stored as float16
    service.close()


@pytest.fixture(scope="module")
def cli_archive(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    """An archive ingested into spp only by real MedVAE (random weights), whose originals are then moved away."""
    root = tmp_path_factory.mktemp("semantic-cli")
    shutil.copytree(archive / "archive", root / "archive")
    env = tiny_env(root / "data", RETRIEVAL_WEIGHTS="random", RETRIEVAL_CLIP_WEIGHTS="random")
    run_cli(env, "ingest", str(root / "archive"))
    shutil.move(root / "archive", root / "moved-away")
    return env, root


def test_cli_reindex_from_stored_z_then_text_search_classify_and_eval(cli_archive: tuple[dict[str, str], Path]) -> None:
    env, root = cli_archive
    assert not (root / "archive").exists()
    built = run_cli(env, "reindex", "--to-pooling", "biomedclip")
    assert "6 vectors derived from stored z" in built.stdout and "biomedclip[random-init:seed=0]" in built.stdout
    key = next(line.split()[1] for line in built.stdout.splitlines() if line.startswith("space "))
    # a text query against the spp space is refused, naming the space that has a text tower
    refused = run_cli(env, "search", "--text", "pleural effusion", check=False)
    assert refused.returncode == 2 and f"Spaces with one: {key}" in refused.stderr
    found = json.loads(run_cli(env, "search", "--text", "right pleural effusion", "--space", key, "--json",
                               "--group-by", "image", "-k", "3").stdout)
    assert found["query"] == {"source": "text", "text": "right pleural effusion"}
    assert len(found["results"]) == 3 and found["space"]["pooling"].startswith("biomedclip")
    assert found["model"]["clip_weights"] == "random-init" and any("RANDOM" in w for w in found["warnings"])
    scores = [result["score"] for result in found["results"]]
    assert scores == sorted(scores, reverse=True)
    combined = json.loads(run_cli(env, "search", "--image-id", "1", "--text", "nodule", "--text-weight", "0.3",
                                  "--space", key, "--json").stdout)
    assert combined["query"] == {"image_id": 1, "text": "nodule", "text_weight": 0.3}
    filtered = json.loads(run_cli(env, "search", "--text", "nodule", "--space", key, "--json", "--filter",
                                  "label=nothing-has-this").stdout)
    assert filtered["results"] == [] and "no image passes all the filters" in filtered["warnings"][0]
    # zero-shot labels: every stored image scored against the prompts
    out = root / "zero-shot.csv"
    run_cli(env, "classify", "--prompts", "effusion=pleural effusion,cardiomegaly", "--space", key, "--out", str(out))
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and {"cosine:effusion", "p:cardiomegaly", "top_label"} <= set(rows[0])
    assert all(abs(float(r["p:effusion"]) + float(r["p:cardiomegaly"]) - 1) < 1e-4 for r in rows)
    # eval: both spaces side by side on one labelled manifest (matched by content: it reads the files), AUROC per prompt
    manifest = root / "labels.csv"
    manifest.write_text("path,labels\n" + "".join(
        f"{root / 'moved-away' / f'study_{s}' / f'img_{i}.png'},{'effusion' if s == 0 else 'normal'}\n"
        for s in range(3) for i in range(2)))
    report = root / "report"
    evaluated = json.loads(run_cli(env | {"RETRIEVAL_POOLING": "biomedclip"}, "eval", str(manifest), "--poolings",
                                   "spp:1,2,4,biomedclip", "--prompts", "effusion=pleural effusion", "--report",
                                   str(report), "--json").stdout)
    poolings = [row["pooling"] for row in evaluated["pooling_study"]]
    assert poolings == ["spp:1,2,4", "biomedclip[random-init:seed=0]"]
    assert all(set(row["per_label"]) == {"effusion", "normal"} for row in evaluated["pooling_study"])
    assert evaluated["zero_shot"]["effusion"]["positives"] == 2 and 0 <= evaluated["zero_shot"]["effusion"]["auroc"] <= 1
    assert (report / "poolings.png").stat().st_size > 1000 and "Zero-shot labels" in (report / "report.md").read_text()


@pytest.fixture(scope="module")
def api(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = tiny_settings(tmp_path_factory.mktemp("semantic-api") / "data", pooling="biomedclip",
                             clip_weights="random")
    service = SpaceService(settings)
    assert IngestPipeline(service).run(archive / "archive").ingested == 6
    with TestClient(create_app(settings, service=service)) as client:
        yield client


def test_api_text_queries(api: TestClient, archive: Path) -> None:
    info = api.get("/v1/info").json()
    assert info["text_search"] and info["random_weights"] and "BiomedCLIP" in info["warning"]
    by_text = api.post("/v1/search", json={"text": "right pleural effusion", "k": 2, "group_by": "image"})
    assert by_text.status_code == 200, by_text.text
    body = by_text.json()
    assert body["query"] == {"source": "text", "text": "right pleural effusion"} and len(body["results"]) == 2
    assert body["model"]["clip_tokenizer"] == "generated-vocabulary"
    upload = (archive / "archive" / "study_1" / "img_0.png").read_bytes()
    both = api.post("/v1/search", files={"file": ("q.png", upload, "image/png")},
                    data={"text": "nodule", "text_weight": "0.25", "k": "1"}).json()
    assert both["query"] == {"source": "q.png", "text": "nodule", "text_weight": 0.25} and len(both["results"]) == 1
    image_weighted = api.post("/v1/search", files={"file": ("q.png", upload, "image/png")},
                              data={"text": "nodule", "text_weight": "0", "k": "1"}).json()
    assert image_weighted["results"][0]["study"]["label"] == "study_1"  # text_weight 0: the image alone decides
    image_only = api.post("/v1/search", json={"image_id": 1, "k": 6, "group_by": "image"}).json()
    with_text = api.post("/v1/search", json={"image_id": 1, "text": "nodule", "text_weight": 1.0, "k": 6,
                                             "group_by": "image"}).json()
    text_only = api.post("/v1/search", json={"text": "nodule", "k": 6, "group_by": "image"}).json()
    ranked = [[image["image_id"] for result in payload["results"] for image in result["images"]]
              for payload in (image_only, with_text, text_only)]
    assert ranked[0][0] == 1 and ranked[1] == ranked[2]  # text_weight 1: the text alone decides
    for bad, field in (({"text": ""}, "text"), ({"text": "x", "text_weight": 2}, "text_weight"),
                       ({"text": "x", "filters": {"modality": "CR", "lable": "y"}}, "lable")):
        response = api.post("/v1/search", json=bad)
        assert response.status_code == 422 and field in response.text, response.text
    spaces = api.get("/v1/spaces").json()
    assert any(space["pooling"].startswith("biomedclip[") and space["dim"] == 512 for space in spaces)


def test_api_text_query_on_a_space_without_a_text_tower_names_the_ones_with(api: TestClient, archive: Path,
                                                                           tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path / "data", extra_poolings="biomedclip", clip_weights="random")
    service = SpaceService(settings)
    IngestPipeline(service).run(archive / "archive")
    (semantic, _), = service.extra_spaces
    with TestClient(create_app(settings, service=service)) as client:
        refused = client.post("/v1/search", json={"text": "pleural effusion"})
        assert refused.status_code == 422 and refused.json()["error"]["detail"]["spaces"] == [semantic.key[:12]]
        served = client.post("/v1/search", json={"text": "pleural effusion", "space": semantic.key[:12]})
        assert served.status_code == 200 and served.json()["space"]["key"] == semantic.key
        assert not client.get("/v1/info").json()["text_search"]
    other_weights = SpaceService(settings.replaced(clip_seed=1), store=service.store)
    with pytest.raises(ConflictError, match="cannot encode queries"):
        SpaceServices(other_weights).get(semantic.key)
