"""Resolving model names: local directories, a fake local hub cache, built-in names, DHT prefixes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from transformers import LlamaConfig

from corolla.errors import ConfigError, ModelNotFound
from corolla.models import resolve
from corolla.models.resolve import ResolvedModel, default_dht_prefix, load_config, resolve_model


def make_model_dir(path: Path, *, weights: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    if weights:
        save_file({"model.embed_tokens.weight": np.zeros((64, 16), np.float32)}, path / "model.safetensors")
    return path


def make_hub_snapshot(hub_cache: Path, repo_id: str, revision: str = "0123456789abcdef") -> Path:
    repo_dir = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return make_model_dir(repo_dir / "snapshots" / revision)


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests never reach the network (tests/integration/hub fetch from a local endpoint)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_local_directory(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "tiny-llama")
    resolved = resolve_model(str(model_dir), tmp_path / "cache")
    assert resolved == ResolvedModel(model_dir.resolve(), "tiny-llama")
    assert load_config(resolved.path).num_hidden_layers == 2


def test_local_directory_without_weights(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "no-weights", weights=False)
    (model_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFound, match="must be in safetensors format"):
        resolve_model(str(model_dir), tmp_path / "cache")


def test_local_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path / "cache")


def test_unknown_name(tmp_path: Path, no_download: None) -> None:
    with pytest.raises(ModelNotFound) as info:
        resolve_model("no-such-model", tmp_path / "cache")
    message = str(info.value)
    assert "neither a local directory" in message and "smollm2-135m" in message
    assert "\n" not in message and "hub repo id (OWNER/NAME)" in message


def test_hub_id_from_local_cache(hub_cache: Path, tmp_path: Path, no_download: None) -> None:
    snapshot = make_hub_snapshot(hub_cache, "owner/tiny-model")
    resolved = resolve_model("owner/tiny-model", tmp_path / "cache")
    assert resolved.path.resolve() == snapshot.resolve()
    assert resolved.name == "owner/tiny-model"
    assert load_config(resolved.path).hidden_size == 16
    assert resolved.hub is None  # a complete snapshot (hf download) is used as it is


def test_hub_cache_under_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_download: None) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    snapshot = make_hub_snapshot(tmp_path / "hf-home" / "hub", "owner/other")
    assert resolve_model("owner/other", tmp_path / "cache").path.resolve() == snapshot.resolve()


def test_hub_id_not_cached(hub_cache: Path, tmp_path: Path, no_download: None) -> None:
    with pytest.raises(ModelNotFound) as info:
        resolve_model("owner/missing", tmp_path / "cache")
    message = str(info.value)
    assert "'owner/missing' (revision main) is not in the cache and the hub is unreachable" in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_revision_is_refused_for_local_models(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "tiny-llama")
    with pytest.raises(ConfigError, match="--revision applies to hub models"):
        resolve_model(str(model_dir), tmp_path / "cache", revision="v2")


def test_builtin_name_and_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    converted = make_model_dir(tmp_path / "converted")
    calls: list[str] = []

    def fake_ensure(name: str, cache_dir: str | Path) -> Path:
        calls.append(name)
        return converted

    monkeypatch.setattr(resolve, "ensure_builtin", fake_ensure)
    for name in ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "SMOLLM2-135M"):  # case-insensitive
        assert resolve_model(name, tmp_path / "cache") == ResolvedModel(converted, "smollm2-135m")
    assert calls == ["smollm2-135m"] * 3


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        ("smollm2-135m", "smollm2-135m"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),  # an alias of the built-in
        ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "SmolLM2-1.7B-Instruct-hf"),
        ("someone/model-hf", "model-hf"),
        ("/models/My Model (v2)", "My-Model--v2"),
        ("tiny-llama", "tiny-llama"),
    ],
)
def test_default_dht_prefix(name: str, prefix: str) -> None:
    assert default_dht_prefix(name) == prefix


def test_a_revision_names_a_swarm_of_its_own() -> None:
    assert default_dht_prefix("someone/model", "main") == "model-hf"
    assert default_dht_prefix("someone/model", "v2.0") == "model-hf-v2.0"
    assert default_dht_prefix("someone/model", "refs/pr/1") == "model-hf-refs-pr-1"


def test_load_config_error_is_typed(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ModelNotFound, match="cannot read the model config"):
        load_config(tmp_path / "bad")
