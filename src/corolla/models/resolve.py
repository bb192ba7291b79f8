"""Turn what the user typed (built-in name, local directory, hub repo id) into a local model directory."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from corolla.errors import ConfigError, ModelNotFound
from corolla.hub.store import is_partial
from corolla.models.builtin import builtin_names, ensure_builtin, find_builtin

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from corolla.hub.model import HubModel

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local transformers directory with config.json and *.safetensors
    name: str  # canonical name: built-in name, hub repo id, or the directory's name
    hub: HubModel | None = None  # a hub model held in part: fetch tensors before reading them

    def fetch(self, names: Collection[str], *, what: str, max_disk_space: int | None = None) -> None:
        """Make sure the checkpoint tensors ``names`` are on disk (a no-op for complete directories)."""
        if self.hub is not None:
            self.hub.fetch(names, what=what, max_disk_space=max_disk_space)


def resolve_model(
    name_or_path: str, cache_dir: str | Path, *, revision: str | None = None, token: str | None = None
) -> ResolvedModel:
    """Built-in name/alias, then an existing local directory, then a hub repo id (fetched in part:
    see ``corolla.hub``). ``revision`` applies to hub models only and is refused for the others,
    whose weights it cannot change; ``token`` is for gated and private hub repos."""
    spec = find_builtin(name_or_path)
    path = Path(name_or_path).expanduser()
    if revision is not None and (spec is not None or path.exists()):
        raise ConfigError(
            f"--revision applies to hub models, not to {name_or_path!r}; drop it or pass a hub repo id"
        )
    if spec is not None:
        return ResolvedModel(ensure_builtin(spec.name, cache_dir), spec.name)
    if path.exists():
        return _from_local(path, token)
    if looks_like_repo_id(name_or_path):
        return _from_hub(name_or_path, cache_dir, revision, token)
    raise ModelNotFound(_not_found(name_or_path))


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name


def default_dht_prefix(name: str, revision: str | None = None) -> str:
    """A DHT-safe prefix for a model: "smollm2-135m", "SmolLM2-1.7B-hf" (hub id) or a directory's name;
    a hub revision other than main makes a swarm of its own ("SmolLM2-1.7B-hf-v2")."""
    spec = find_builtin(name)
    if spec is not None:
        return spec.name
    if looks_like_repo_id(name) and not Path(name).exists():
        base = name.split("/")[-1]
        base = base if base.endswith("-hf") else f"{base}-hf"
        if revision not in (None, "main"):
            base = f"{base}-{revision}"
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


def _from_local(path: Path, token: str | None) -> ResolvedModel:
    path = path.resolve()
    check_model_dir(path)
    if is_partial(path):  # a directory of corolla's hub cache, passed by path
        from corolla.hub.model import hub_model_at

        hub = hub_model_at(path, token)
        return ResolvedModel(path, hub.repo_id, hub)
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


def _from_hub(repo_id: str, cache_dir: str | Path, revision: str | None, token: str | None) -> ResolvedModel:
    """A complete snapshot in the Hugging Face cache (``hf download``) as it is; otherwise the
    model held in part in corolla's cache, fetched tensor by tensor when loaded."""
    path = _cached_snapshot(repo_id, revision)
    if path is not None and _is_model_dir(path):
        logger.info("model %s found in the Hugging Face cache: %s", repo_id, path)
        return ResolvedModel(path, repo_id)
    from corolla.hub.model import open_hub_model

    hub = open_hub_model(repo_id, revision=revision, token=token, cache_dir=cache_dir)
    return ResolvedModel(hub.path, repo_id, hub)


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, local_files_only=True, cache_dir=_hub_cache_dir()
            )
        )
    except Exception:  # not cached, partly cached, unreadable: all mean "not here"
        return None


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
    return (
        f"model {name!r} is neither a local directory, nor a built-in name ({', '.join(builtin_names())}), "
        f"nor a hub repo id (OWNER/NAME); pass a directory with config.json + *.safetensors, a built-in "
        f"name, or a hub repo id such as HuggingFaceTB/SmolLM2-1.7B-Instruct"
    )
