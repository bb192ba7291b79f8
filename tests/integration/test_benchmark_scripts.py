"""The performance benchmarks run end to end on the built-in model (short settings) and report
every figure of the performance table; nothing here asserts on time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from corolla.runtime.thread_tuner import candidate_counts

pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
SHORT = ["--repeats", "1", "--warmup", "0", "--max_new_tokens", "4", "--sessions", "3"]


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_decode_reports_the_whole_table_with_exact_tokens() -> None:
    report = json.loads(run("bench_decode.py", *SHORT, "--prefill_tokens", "32", "--json"))
    assert report["tokens_identical"] and report["serving"]["concurrent_identical"]
    assert set(report["ratios"]) == {"swarm_1", "swarm_2"}
    assert all(r["decode_vs_local"] > 0 for r in report["ratios"].values())
    threads = [report["phases"][key]["decode_threads"] for key in ("swarm_1", "swarm_2")]
    assert [len(t) for t in threads] == [1, 2] and all(n >= 1 for t in threads for n in t)
    serving = report["serving"]
    assert serving["prefill_vs_local"] > 0 and serving["concurrent_vs_one_session"] > 0
    assert 0 < serving["slowest_startup_s"] < 120


def test_profile_token_splits_a_token_for_each_configuration() -> None:
    out = run("profile_token.py", *SHORT)
    rows = {
        line.split("  ")[0]: line
        for line in out.splitlines()
        if line.startswith(("one session", "3 sessions"))
    }
    assert set(rows) == {
        "one session, 1 server",
        "one session, 2 servers",
        "3 sessions, 1 server (per round)",
    }
    assert "steps/pass" in rows["3 sessions, 1 server (per round)"]


def test_profile_pass_splits_a_pass_into_floor_and_kernels_per_thread_count() -> None:
    out = run("profile_pass.py", "--passes", "2")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    counts = [int(r[0]) for r in rows]
    assert counts and counts == list(candidate_counts(counts[0])) and counts[-1] == 1  # as a server tries
    for _threads, real, floor, kernels, rate in rows:
        assert float(real) > 0 and float(floor) > 0 and float(rate) > 0
        assert abs(max(float(real) - float(floor), 0.0) - float(kernels)) < 0.15  # kernels = pass - floor


def test_bench_api_reports_each_way_of_asking_for_several_answers() -> None:
    report = json.loads(run("bench_api.py", "--choices", "2", "--tokens", "4", "--repeats", "1", "--json"))
    assert (report["choices"], report["tokens"]) == (2, 4)
    for name in ("one_by_one", "n", "prompt_list"):
        assert report[name]["seconds"] > 0 and report[name]["tokens_per_s"] > 0
    assert report["n"]["speedup"] > 0 and report["prompt_list"]["speedup"] > 0


def test_bench_hub_reports_bytes_readiness_and_memory_per_server(tmp_path: Path) -> None:
    tiny = ["--hidden_size", "128", "--intermediate_size", "256", "--num_blocks", "4", "--vocab_size", "256"]
    report = json.loads(run("bench_hub.py", *tiny, "--servers", "2", "--cache_dir", str(tmp_path), "--json"))
    assert [row["span"] for row in report["servers"]] == ["0:2", "2:4"]
    for row in report["servers"]:
        assert 1.0 <= row["fetched_ratio"] <= 1.1 and row["fetched_warm"] == 0
        assert row["ready_cold_s"] > 0 and row["ready_warm_s"] > 0
        assert row["pss_after_forward"] > row["span_bytes"]
