from __future__ import annotations

import json
import logging
import math
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from corolla.errors import ConfigError
from corolla.runtime.throughput import (
    CACHE_FILE,
    DEFAULT_BANDWIDTH,
    ComputeThroughput,
    ThroughputCache,
    average_blocks_used,
    cache_key,
    combine,
    measure_compute,
    network_tokens_per_s,
    resolve_throughput,
)
from helpers.models import tiny_llama_config

CPU = torch.device("cpu")
COMPUTE = ComputeThroughput(forward_tokens_per_s=5000.0, inference_steps_per_s=100.0)


def test_average_blocks_used_is_the_mean_of_uniform_1_to_n() -> None:
    assert average_blocks_used(1) == 1.0
    assert average_blocks_used(4) == 2.5  # (1 + 2 + 3 + 4) / 4
    assert average_blocks_used(30) == 15.5
    with pytest.raises(ValueError):
        average_blocks_used(0)


def test_combine_divides_compute_by_blocks_used_and_caps_by_network() -> None:
    assert combine(COMPUTE, 4, None) == 40.0  # 100 / 2.5
    assert combine(COMPUTE, 4, 1000.0) == 40.0
    assert combine(COMPUTE, 4, 30.0) == 30.0
    assert combine(COMPUTE, 1, None) == 100.0


def test_network_tokens_per_s_counts_hidden_states_in_and_out() -> None:
    assert DEFAULT_BANDWIDTH == 100e6 / 8
    assert network_tokens_per_s(DEFAULT_BANDWIDTH, 576, 4) == pytest.approx(12.5e6 / (2 * 576 * 4))
    assert network_tokens_per_s(1000.0, 10, 2) == 25.0


def test_compute_throughput_round_trips_and_rejects_bad_figures() -> None:
    assert ComputeThroughput.from_dict({**COMPUTE.to_dict(), "measured_at": "x"}) == COMPUTE
    for bad in ({}, {"forward_tokens_per_s": 1.0}, {**COMPUTE.to_dict(), "inference_steps_per_s": -1}):
        with pytest.raises(ValueError):
            ComputeThroughput.from_dict(bad)


def test_cache_key_names_model_device_dtype_and_quant() -> None:
    key = cache_key("smollm2-135m", CPU, torch.bfloat16)
    model, device_type, name, dtype, quant = key.split("|")
    assert (model, device_type, dtype, quant) == ("smollm2-135m", "cpu", "bfloat16", "none")
    assert name.rsplit(" x", 1)[1].isdigit()  # the CPU model and the core count


class Counter:
    """A measure() that counts its calls; thread-safe."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
            n = self.calls
        time.sleep(self.delay)
        return {"figure": n}


def test_cache_measures_once_then_reuses(tmp_path: Path) -> None:
    measure = Counter()
    assert ThroughputCache(tmp_path).get_or_measure("k", measure) == ({"figure": 1}, True)
    assert ThroughputCache(tmp_path).get_or_measure("k", measure) == ({"figure": 1}, False)
    assert ThroughputCache(tmp_path).get_or_measure("other", measure) == ({"figure": 2}, True)
    assert measure.calls == 2
    data = json.loads((tmp_path / CACHE_FILE).read_text())
    assert data == {"version": 1, "entries": {"k": {"figure": 1}, "other": {"figure": 2}}}


def test_force_measures_again_and_overwrites(tmp_path: Path) -> None:
    measure = Counter()
    cache = ThroughputCache(tmp_path)
    cache.get_or_measure("k", measure)
    assert cache.get_or_measure("k", measure, force=True) == ({"figure": 2}, True)
    assert cache.get_or_measure("k", measure) == ({"figure": 2}, False)


def test_corrupt_file_is_measured_again_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / CACHE_FILE).write_text('{"version": 1, "entries": {"k": ')
    measure = Counter()
    with caplog.at_level(logging.WARNING, logger="corolla.runtime.throughput"):
        assert ThroughputCache(tmp_path).get_or_measure("k", measure) == ({"figure": 1}, True)
    assert "unreadable" in caplog.text
    assert ThroughputCache(tmp_path).get_or_measure("k", measure) == ({"figure": 1}, False)


def test_invalid_entry_is_measured_again(tmp_path: Path) -> None:
    measure = Counter()
    cache = ThroughputCache(tmp_path)
    cache.get_or_measure("k", measure)
    figures, measured = cache.get_or_measure("k", measure, valid=lambda entry: entry["figure"] > 1)
    assert (figures, measured) == ({"figure": 2}, True)


def test_threads_racing_measure_only_once(tmp_path: Path) -> None:
    measure = Counter(delay=0.2)
    results: list[tuple[dict[str, Any], bool]] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(ThroughputCache(tmp_path).get_or_measure("k", measure))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert measure.calls == 1
    assert sorted(measured for _, measured in results) == [False, False, False, True]
    assert all(figures == {"figure": 1} for figures, _ in results)


def _measure_in_process(cache_dir: str, log: str) -> None:
    def measure() -> dict[str, Any]:
        with open(log, "a") as f:
            f.write("measured\n")
        time.sleep(0.2)
        return {"figure": 1}

    ThroughputCache(cache_dir).get_or_measure("k", measure)


def test_processes_racing_measure_only_once(tmp_path: Path) -> None:
    log = tmp_path / "measured.log"
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_measure_in_process, args=(str(tmp_path), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=10)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text() == "measured\n"


def _resolve(tmp_path: Path, mode: str, measure: Any, **kwargs: Any) -> Any:
    return resolve_throughput(
        mode,
        num_blocks=4,
        measure=measure,
        cache=ThroughputCache(tmp_path),
        key="m|cpu|x|float32|none",
        **kwargs,
    )


class ComputeCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> ComputeThroughput:
        self.calls += 1
        return COMPUTE


def test_a_number_is_announced_as_is_without_measuring(tmp_path: Path) -> None:
    measure = ComputeCounter()
    report = _resolve(tmp_path, "123.5", measure, network_tokens_per_s=1.0)
    assert (report.throughput, report.source, measure.calls) == (123.5, "fixed", 0)
    assert not (tmp_path / CACHE_FILE).exists()


def test_auto_measures_once_then_uses_the_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    measure = ComputeCounter()
    first = _resolve(tmp_path, "auto", measure)
    assert (first.source, first.throughput, first.compute) == ("measured", 40.0, COMPUTE)
    with caplog.at_level(logging.INFO, logger="corolla.runtime.throughput"):
        second = _resolve(tmp_path, "auto", measure, network_tokens_per_s=25.0)
    assert (second.source, second.throughput, measure.calls) == ("cached", 25.0, 1)
    assert "using cached throughput" in caplog.text and "measured at" in caplog.text
    assert second.measured_at == first.measured_at is not None


@pytest.mark.parametrize("mode", ["eval", "dry_run"])
def test_eval_and_dry_run_measure_again(tmp_path: Path, mode: str) -> None:
    measure = ComputeCounter()
    _resolve(tmp_path, "auto", measure)
    report = _resolve(tmp_path, mode, measure)
    assert (report.source, measure.calls) == ("measured", 2)
    assert "40.00 tokens/s per block" in report.summary()
    assert _resolve(tmp_path, "auto", measure).source == "cached"


def test_invalid_mode_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--throughput"):
        _resolve(tmp_path, "fast", ComputeCounter())


def test_measure_compute_on_a_tiny_model_is_positive_and_quick() -> None:
    config = tiny_llama_config()
    started = time.perf_counter()
    result = measure_compute(
        config, CPU, torch.float32, forward_tokens=64, forward_repeats=2, inference_steps=10, progress=False
    )
    assert time.perf_counter() - started < 5
    for value in (result.forward_tokens_per_s, result.inference_steps_per_s):
        assert math.isfinite(value) and value > 0
