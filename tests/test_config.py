"""Settings come in groups, yet every setting keeps its one environment name (RETRIEVAL_<FLAT NAME>)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import run_cli
from pydantic import ValidationError

from retrieval.cli.common import settings_error_message
from retrieval.config import FLAT_NAMES, RETIRED_NAMES, Settings


def test_environment_names_fill_their_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("RETRIEVAL_HNSW_M=16\nRETRIEVAL_DICOMWEB_RETRIES=9\n")
    monkeypatch.setenv("RETRIEVAL_DICOMWEB_RETRIES", "5")  # the environment wins over .env
    monkeypatch.setenv("retrieval_model", "medvae_4_1_3d")  # names are matched without regard to case
    monkeypatch.setenv("RETRIEVAL_JOB_STALE_SECONDS", "30")
    settings = Settings(weights="fake")  # arguments take the same flat names
    assert settings.dicomweb.retries == 5 and settings.index.hnsw_m == 16 and settings.jobs.stale_seconds == 30
    assert settings.model.name == "medvae_4_1_3d" and settings.model.dims == 3 and settings.model.weights == "fake"
    moved = settings.replaced(pooling="grid:2", volume_max_voxels=64**3)
    assert moved.model.pooling == "grid:2" and moved.model.space_input_size == 64**3 and moved.dicomweb.retries == 5
    assert settings.model.pooling == "spp:1,2,4"  # the original is unchanged (settings are frozen)


def test_every_historical_name_is_still_a_setting_or_retired_with_its_reason(tmp_path: Path) -> None:
    names = {"data_dir", "database_url", "model", "weights", "model_config_path", "hub_repo", "hub_revision", "seed",
             "input_size", "volume_size", "volume_roi", "device", "precision", "runtime", "compile", "batch_size",
             "decode_workers", "pooling", "id_secret", "max_image_pixels", "date_shift_days", "overfetch", "api_keys",
             "max_request_bytes", "url_fetch_timeout", "url_allow_hosts", "index_type", "hnsw_min_vectors", "hnsw_m",
             "hnsw_ef_search", "ingest_quality", "ingest_roots", "job_heartbeat_seconds", "job_stale_seconds",
             "query_batching", "query_batch_wait_ms", "dicomweb_username", "dicomweb_password", "dicomweb_token",
             "dicomweb_retries", "dicomweb_backoff", "dicomweb_timeout", "dicomweb_fetch_workers", "dicomweb_allowed_urls"}
    assert set(FLAT_NAMES) - names == {"manifest_columns", "fit", "volume_max_voxels", "extra_poolings", "clip_weights",
                                       "clip_repo", "clip_revision", "clip_seed", "clip_tokenizer",
                                       "index_memory_mb", "index_nprobe", "index_rescore", "query_fit_device",
                                       "ingest_fit_device", "ingest_frame_decoder", "query_frame_decoder"}  # added since
    assert names - set(FLAT_NAMES) == set(RETIRED_NAMES) == {"volume_size"}  # vol-v3: native spacing, a voxel budget
    with pytest.raises(ValidationError, match="RETRIEVAL_VOLUME_SIZE was retired .* RETRIEVAL_VOLUME_MAX_VOXELS"):
        Settings(volume_size=128)
    refused = run_cli({"RETRIEVAL_DATA_DIR": str(tmp_path), "RETRIEVAL_VOLUME_SIZE": "64"}, "doctor", check=False)
    assert refused.returncode == 2 and "RETRIEVAL_VOLUME_SIZE was retired" in refused.stderr


def test_a_typo_or_a_bad_value_is_named_as_the_user_wrote_it(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="unknown setting `wieghts`"):
        Settings(wieghts="random")
    with pytest.raises(ValidationError) as bad:
        Settings(input_size="big", index_type="ivf")
    message = settings_error_message(bad.value)
    assert "RETRIEVAL_INPUT_SIZE (model.input_size)" in message and "got 'big'" in message
    assert "RETRIEVAL_INDEX_TYPE (index.type)" in message
    env = {"RETRIEVAL_DATA_DIR": str(tmp_path), "RETRIEVAL_DICOMWEB_TIMEOUT": "-3"}
    refused = run_cli(env, "doctor", check=False)
    assert refused.returncode == 2 and "RETRIEVAL_DICOMWEB_TIMEOUT (dicomweb.timeout)" in refused.stderr


def test_postgres_urls_mean_psycopg_and_other_databases_are_refused() -> None:
    """Issue 16.7: `postgres://` (Heroku's spelling) and `postgresql://` are accepted as psycopg 3."""
    for given in ("postgres://u@db.example/archive", "postgresql://u@db.example/archive"):
        url = Settings(database_url=given, id_secret="ours").storage.database_url
        assert url == "postgresql+psycopg://u@db.example/archive"
    with pytest.raises(ValidationError, match="`mysql` databases are not supported"):
        Settings(database_url="mysql://u@h/db")
