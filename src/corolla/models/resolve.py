"""Turn what the user typed (built-in name, local directory, hub repo id) into a local model directory."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from corolla.errors import ModelNotFound
from corolla.models.builtin import builtin_names, ensure_builtin, find_builtin

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
# What a download fetches: configs, tokenizer files and safetensors weights (never *.bin, *.onnx, …).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]
_HUB_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local transformers directory with config.json and *.safetensors
    name: str  # canonical name: built-in name, hub repo id, or the directory's name


def resolve_model(name_or_path: str, cache_dir: str | Path) -> ResolvedModel:
    """Built-in name/alias, then an existing local directory, then a hub repo id (cache first)."""
    spec = find_builtin(name_or_path)
    if spec is not None:
        return ResolvedModel(ensure_builtin(spec.name, cache_dir), spec.name)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _from_local(path)
    if looks_like_repo_id(name_or_path):
        return _from_hub(name_or_path)
    raise ModelNotFound(_not_found(name_or_path))


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name


def default_dht_prefix(name: str) -> str:
    """A DHT-safe prefix for a model: "smollm2-135m", "SmolLM2-1.7B-hf" (hub id) or a directory's name."""
    spec = find_builtin(name)
    if spec is not None:
        return spec.name
    if looks_like_repo_id(name) and not Path(name).exists():
        base = name.split("/")[-1]
        base = base if base.endswith("-hf") else f"{base}-hf"
    else:
        base = Path(name.rstrip("/\\")).name or name
    return _UNSAFE.sub("-", base).strip("-.") or "model"


def load_config(path: str | Path) -> PretrainedConfig:
    """The transformers config of a resolved model directory."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFound(f"cannot read the model config in {path}: {reason}") from error


# ---------------------------------------------------------------- local directories


def _from_local(path: Path) -> ResolvedModel:
    path = path.resolve()
    check_model_dir(path)
    return ResolvedModel(path, path.name)


def check_model_dir(path: Path) -> None:
    """Raise ModelNotFound unless ``path`` is a transformers directory with safetensors weights."""
    if not path.is_dir():
        raise ModelNotFound(
            f"{path} is a file, not a model directory; pass a transformers directory (config.json + "
            "*.safetensors), a hub repo id or a built-in name"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} has no config.json; pass a transformers model directory")
    if not any(path.glob("*.safetensors")):
        raise ModelNotFound(
            f"{path} has no *.safetensors weights; the model must be in safetensors format "
            "(re-save it with model.save_pretrained(dir), which writes safetensors)"
        )


# ---------------------------------------------------------------- the Hugging Face hub


def _from_hub(repo_id: str) -> ResolvedModel:
    path = _cached_snapshot(repo_id)
    if path is None or not _is_model_dir(path):
        path = _download_snapshot(repo_id, _hub_cache_dir())
    if path is None:
        raise ModelNotFound(_not_found(repo_id))
    check_model_dir(path)
    logger.info("model %s found in the hub cache: %s", repo_id, path)
    return ResolvedModel(path, repo_id)


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=_hub_cache_dir()))
    except Exception:  # not cached, partly cached, unreadable: all mean "not here"
        return None


def _download_snapshot(repo_id: str, cache_dir: str | None) -> Path | None:
    """Try the hub once, briefly; None on any failure (offline, unknown repo, gated, …)."""
    from huggingface_hub import snapshot_download

    logger.info("model %s is not in the local hub cache; trying to download it", repo_id)
    try:
        path = snapshot_download(
            repo_id, cache_dir=cache_dir, allow_patterns=_HUB_PATTERNS, etag_timeout=_HUB_TIMEOUT_S
        )
    except Exception as error:  # offline, unknown or gated repo, timeout: all mean "not available"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        logger.info("download of %s failed: %s", repo_id, reason)
        return None
    return Path(path)


def _hub_cache_dir() -> str | None:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return cache
    if home := os.environ.get("HF_HOME"):
        return str(Path(home) / "hub")
    return None  # the library's default (~/.cache/huggingface/hub)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _not_found(name: str) -> str:
    fetch = name if looks_like_repo_id(name) else "OWNER/NAME"
    return (
        f"model {name!r} is neither a local directory, nor a built-in name ({', '.join(builtin_names())}), "
        f"nor in the Hugging Face hub cache; pass a directory with config.json + *.safetensors, or fetch "
        f"it first with: hf download {fetch}"
    )
