"""Hub repo ids without network: a cached model resolves from the local cache, a missing one fails fast and
says which cache folder was checked and how to work offline."""

import shutil
import time

import pytest
from huggingface_hub import constants

from sdjax import weights

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An empty Hugging Face cache under a temporary HF_HOME; online mode unless a test sets it."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                     "HF_HUB_ETAG_TIMEOUT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest turned it on at import
    return home / "hub"


def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _resolve_failure(repo_id="someorg/somemodel"):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        weights.resolve_model_dir(repo_id)
    return info.value, time.monotonic() - start


def _check_message(error, cache):
    message = str(error)
    assert isinstance(error, weights.HubUnreachableError) and isinstance(error, OSError)
    assert "'someorg/somemodel'" in message
    assert str(cache / "models--someorg--somemodel") in message
    assert "HF_HUB_OFFLINE=1" in message and "local diffusers-layout folder" in message
    assert "\n" not in message


def test_unreachable_hub_fails_fast_with_the_cache_folder_named(hub_env, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no network, anywhere
    error, seconds = _resolve_failure()
    _check_message(error, hub_env)
    assert "cannot be reached (ConnectError" in str(error) or "cannot be reached (" in str(error)
    assert seconds < 5


def test_no_network_here_fails_within_five_seconds(hub_env):
    # The real hub endpoint: without network (as on the test machines) the error comes at once, not after
    # huggingface_hub's retry loop; with network the hub answers that the repo does not exist.
    error, seconds = _resolve_failure()
    if isinstance(error, weights.HubUnreachableError):
        _check_message(error, hub_env)
    else:
        assert "not found" in str(error)
    assert seconds < 5, seconds


def test_offline_mode_with_an_empty_cache(hub_env, monkeypatch):
    _offline(monkeypatch)
    error, seconds = _resolve_failure()
    _check_message(error, hub_env)
    assert "HF_HUB_OFFLINE=1 is set" in str(error)
    assert seconds < 1


def _cache_model(cache, folder, repo_id="org/name"):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SNAPSHOT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return snapshot


def test_cached_model_resolves_offline(hub_env, monkeypatch, tiny_pipeline_dir):
    snapshot = _cache_model(hub_env, tiny_pipeline_dir)
    _offline(monkeypatch)
    assert weights.resolve_model_dir("org/name") == snapshot
    assert weights.resolve_model_dir("org/name", revision=SNAPSHOT) == snapshot
    config, _ = weights.load_pretrained(weights.resolve_model_dir("org/name"), dtype="float32")
    assert config == weights.read_model_config(tiny_pipeline_dir)
    # Online but unreachable: the complete cached copy is used without asking the hub.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert weights.resolve_model_dir("org/name") == snapshot


def test_incomplete_cached_model_is_named(hub_env, monkeypatch, tiny_pipeline_dir):
    snapshot = _cache_model(hub_env, tiny_pipeline_dir, "someorg/somemodel")
    for file in (snapshot / "unet").glob("*.safetensors"):
        file.unlink()
    _offline(monkeypatch)
    error, _ = _resolve_failure()
    assert isinstance(error, weights.HubUnreachableError)
    assert "is incomplete (missing unet weights)" in str(error)
    assert str(hub_env / "models--someorg--somemodel") in str(error)
