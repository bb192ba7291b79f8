"""Lower-precision servers of the built-in model: bfloat16, int8 and nf4 (bitsandbytes on CPU).

Runs ``benchmarks/bench_quant.py`` once for the three variants (one after another, each with
servers of its own; about a minute here, against a 500 s timeout). Each serves the built-in model
with two servers and compares them with local float32 transformers: weights per block from the
servers' ``info`` replies, greedy agreement over the first 4 of its fixed prompts x 16 tokens (to
keep the suite short; a float32 swarm's exactness is the job of the exactness and built-in model
tests, so its run is left to the benchmark). The bounds are loose on purpose: they catch a broken
path (wrong bytes, garbage tokens), not small quality shifts. The full benchmark (8 prompts)
measured here: bf16 2.00x fewer bytes, 8/8 identical, 97.7 % top-1; int8 3.97x, 90.6 %; nf4
7.70x, 72.7 %."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_quant.py"


VARIANTS = ("bf16", "int8", "nf4")


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, float]]:
    """Each variant's figures, from one run of the benchmark."""
    log_dir = tmp_path_factory.mktemp("quant")
    result = subprocess.run(
        [sys.executable, str(BENCH), "--variants", *VARIANTS, "--prompts", "4", "--json",
         "--log_dir", str(log_dir)],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads(result.stdout.strip().splitlines()[-1])}
    assert set(rows) == set(VARIANTS)
    return rows.__getitem__


def test_bfloat16_halves_the_weights_and_keeps_nearly_all_tokens(
    figures: Callable[[str], dict[str, float]],
) -> None:
    bf16 = figures("bf16")
    assert bf16["bytes_vs_fp32"] == pytest.approx(2.0, rel=0.01)
    assert bf16["identical"] >= 3
    assert bf16["top1"] >= 0.9


def test_int8_weights_are_about_four_times_smaller(figures: Callable[[str], dict[str, float]]) -> None:
    int8 = figures("int8")
    assert 3.5 <= int8["bytes_vs_fp32"] <= 4.1
    assert int8["top1"] >= 0.75


def test_nf4_weights_are_about_seven_times_smaller(figures: Callable[[str], dict[str, float]]) -> None:
    nf4 = figures("nf4")
    assert 6.5 <= nf4["bytes_vs_fp32"] <= 8.1
    assert nf4["top1"] >= 0.5
