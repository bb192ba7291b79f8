"""The throughput a server announces: measured compute, a network cap, and a cache of measurements.

What is announced is a rate of *inference tokens per second per block*, comparable between
servers that host different numbers of blocks:

    throughput = min(inference_steps_per_s / average_blocks_used(num_blocks), network_tokens_per_s)

- ``inference_steps_per_s`` is measured on ONE block: single-token decoding steps with a KV
  cache, on the real device and dtype (``measure_compute``). A step through ``k`` of this
  server's blocks takes ``k`` times as long, so the server completes ``steps_per_s / k``
  requests per second.
- ``average_blocks_used(n) = (n + 1) / 2``: a client's route runs through the whole model, so it
  uses a contiguous run of this server's span that touches one of the span's ends (it enters
  mid-span and stays to the end, or enters at the start and leaves mid-span). With the other
  end uniform over the ``n`` blocks, the run's length is uniform on ``1..n`` and its mean is
  ``(n + 1) / 2``. This is Petals' rule, so the figures stay comparable to Petals'. Treating
  both ends as uniform (``(n + 2) / 3``) would count middle-only runs, which a route through
  the whole model rarely uses (they need two other servers on either side).
- ``network_tokens_per_s`` (``network_tokens_per_s()``): every token's hidden state comes in
  and goes out once per request, so a link of ``B`` bytes/s carries ``B / (2 * hidden * bytes)``
  tokens/s. Peers are measured over the swarm's own transport by the server; with no peer to
  measure against it uses ``DEFAULT_BANDWIDTH``. The network figure is not cached (it changes
  with the peers); the compute figures are.

The compute figures are cached in ``<cache_dir>/throughput.json`` per (model, device, dtype,
quantisation), under a file lock held across check-measure-write so that two servers starting
together measure once (the second waits, then reuses the first one's figures).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from tqdm import tqdm
from transformers import PretrainedConfig

from corolla.config import THROUGHPUT_MODES
from corolla.errors import ConfigError
from corolla.models.span import SpanModel, build_span_on_meta, span_config
from corolla.runtime.loader import place_span

logger = logging.getLogger(__name__)

# 100 Mbit/s, a common home uplink: used when no peer of the swarm can be measured.
DEFAULT_BANDWIDTH = 100e6 / 8  # bytes/s
CACHE_FILE = "throughput.json"
CACHE_VERSION = 1


@dataclass(frozen=True)
class ComputeThroughput:
    """One block's speed on this device: long-batch forward tokens/s, single-token steps/s."""

    forward_tokens_per_s: float
    inference_steps_per_s: float

    def to_dict(self) -> dict[str, float]:
        return {
            "forward_tokens_per_s": self.forward_tokens_per_s,
            "inference_steps_per_s": self.inference_steps_per_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComputeThroughput:
        """Raises ``ValueError`` unless both figures are positive finite numbers."""
        try:
            values = [float(data["forward_tokens_per_s"]), float(data["inference_steps_per_s"])]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a compute throughput: {data!r}") from e
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"compute throughput must be positive and finite: {data!r}")
        return cls(*values)


# --- the announced figure (pure) ---------------------------------------------------------------


def average_blocks_used(num_blocks: int) -> float:
    """Mean number of this server's blocks one request runs through: ``(n + 1) / 2``."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    return (num_blocks + 1) / 2


def network_tokens_per_s(bandwidth_bytes_per_s: float, hidden_size: int, dtype_bytes: int) -> float:
    """Tokens/s a link carries when each token's hidden state goes in and comes out once."""
    return bandwidth_bytes_per_s / (2 * hidden_size * dtype_bytes)


def combine(compute: ComputeThroughput, num_blocks: int, network_tokens_per_s: float | None) -> float:
    """The announced throughput in inference tokens/s per block (see the module docstring)."""
    per_request = compute.inference_steps_per_s / average_blocks_used(num_blocks)
    return per_request if network_tokens_per_s is None else min(per_request, network_tokens_per_s)


# --- measuring compute ---------------------------------------------------------------------------


def random_block(
    model_config: PretrainedConfig,
    device: torch.device,
    dtype: torch.dtype,
    quant_type: str = "none",
    tp_devices: tuple[torch.device, ...] = (),
) -> SpanModel:
    """One block of the model with small random weights, placed as the server places its blocks
    (on ``device``, or sharded over ``tp_devices``; quantised to ``quant_type``). No checkpoint needed."""
    span = build_span_on_meta(span_config(model_config, 0, 1), 0, 1)
    staging = torch.device("cpu") if quant_type != "none" or tp_devices else device
    span.layers.to(dtype).to_empty(device=staging)
    generator = torch.Generator(device=staging).manual_seed(0)
    with torch.no_grad():
        for p in span.layers.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=generator)
            else:  # norm weights and biases
                p.fill_(1.0)
    return place_span(span, device=device, quant_type=quant_type, tp_devices=tp_devices)


def measure_compute(
    model_config: PretrainedConfig,
    device: torch.device,
    dtype: torch.dtype,
    *,
    quant_type: str = "none",
    tp_devices: tuple[torch.device, ...] = (),
    forward_tokens: int = 512,
    forward_repeats: int = 5,
    prompt_tokens: int = 16,
    inference_steps: int = 100,
    progress: bool = True,
) -> ComputeThroughput:
    """Time one random block after a warm-up: forward passes of ``1 x forward_tokens`` tokens,
    then single-token steps with a KV cache after a ``prompt_tokens`` prefill. Each pass is timed
    on its own and the median is kept, so a burst of load from another process does not skew it."""
    block = random_block(model_config, device, dtype, quant_type, tp_devices)
    long_batch = torch.randn(1, forward_tokens, model_config.hidden_size, device=device).to(dtype)
    prompt, step = long_batch[:, :prompt_tokens], long_batch[:, :1]
    with torch.inference_mode(), _progress_bar(forward_repeats + inference_steps + 2, progress) as bar:
        _median_seconds(lambda: block(long_batch), 1, device, bar)  # warm-up
        forward_s = _median_seconds(lambda: block(long_batch), forward_repeats, device, bar)
        cache = block.new_cache()
        block(prompt, cache=cache)
        _median_seconds(lambda: block(step, cache=cache), 1, device, bar)  # warm-up of the cached path
        step_s = _median_seconds(lambda: block(step, cache=cache), inference_steps, device, bar)
    return ComputeThroughput(
        forward_tokens_per_s=forward_tokens / forward_s, inference_steps_per_s=1 / step_s
    )


def _progress_bar(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, desc="measuring throughput", unit="pass", file=sys.stderr, disable=not enabled)


def _median_seconds(run: Callable[[], object], repeats: int, device: torch.device, bar: tqdm) -> float:
    """The median wall time of ``repeats`` calls of ``run``, each waited for on ``device``."""
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - started)
        bar.update(1)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# --- naming what was measured --------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The CUDA card's name, or the CPU model and the cores this process may use."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"{_cpu_model()} x{_cpu_count()}"


def cache_key(
    model_name: str, device: torch.device, dtype: torch.dtype, quant: str = "none", tensor_parallel: int = 1
) -> str:
    """``model|device type|device name|dtype|quant[|tpN]``: what a measurement depends on."""
    dtype_name = str(dtype).removeprefix("torch.")
    key = f"{model_name}|{device.type}|{device_name(device)}|{dtype_name}|{quant}"
    return key if tensor_parallel == 1 else f"{key}|tp{tensor_parallel}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_count() -> int:
    """The cores this process computes on: those it may use, at most its torch threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, torch.get_num_threads())


# --- the cache -----------------------------------------------------------------------------------


class ThroughputCache:
    """``<cache_dir>/throughput.json``: ``{"version": 1, "entries": {key: figures}}``, read and
    written under ``<cache_dir>/throughput.json.lock``."""

    def __init__(self, cache_dir: str | Path, *, lock_timeout: float = 600.0) -> None:
        self.path = Path(cache_dir) / CACHE_FILE
        self.lock_timeout = lock_timeout

    def get_or_measure(
        self,
        key: str,
        measure: Callable[[], dict[str, Any]],
        *,
        force: bool = False,
        valid: Callable[[dict[str, Any]], bool] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """The cached figures for ``key`` (``measured_now`` False), or ``measure()``'s, stored
        (``measured_now`` True). ``force`` measures even when cached; entries that ``valid``
        rejects are measured again. The lock is held across check, measure and write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{self.path}.lock", timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            logger.warning(
                "the throughput cache %s stayed locked for %.0f s; measuring without it",
                self.path,
                self.lock_timeout,
            )
            return measure(), True
        try:
            return self._get_or_measure_locked(key, measure, force, valid)
        finally:
            lock.release()

    def _get_or_measure_locked(
        self,
        key: str,
        measure: Callable[[], dict[str, Any]],
        force: bool,
        valid: Callable[[dict[str, Any]], bool] | None,
    ) -> tuple[dict[str, Any], bool]:
        entries = self._read()
        cached = entries.get(key)
        if cached is not None and not force:
            if isinstance(cached, dict) and (valid is None or valid(cached)):
                return cached, False
            logger.warning("the cached throughput for %s in %s is invalid; measuring again", key, self.path)
        figures = measure()
        entries[key] = figures
        self._write(entries)
        return figures, True

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            logger.warning("the throughput cache %s is unreadable (%s); measuring again", self.path, e)
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            logger.warning("the throughput cache %s has an unknown format; measuring again", self.path)
            return {}
        entries = data.get("entries")
        return dict(entries) if isinstance(entries, dict) else {}

    def _write(self, entries: dict[str, Any]) -> None:
        """Write atomically (temporary file + rename); a failure only costs a re-measure later."""
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=2))
            os.replace(tmp, self.path)
        except OSError as e:
            logger.warning(
                "cannot write the throughput cache %s (%s); it will be measured again", self.path, e
            )


# --- orchestration for --throughput ---------------------------------------------------------------


@dataclass(frozen=True)
class ThroughputReport:
    """The announced figure and where it came from: ``fixed`` (a number), ``cached`` or ``measured``."""

    throughput: float
    source: str
    num_blocks: int
    compute: ComputeThroughput | None = None
    network_tokens_per_s: float | None = None
    key: str | None = None
    measured_at: str | None = None

    def summary(self) -> str:
        """Lines for ``--throughput dry_run`` to print."""
        lines = [
            f"throughput: {self.throughput:.2f} tokens/s per block ({self.source}, {self.num_blocks} blocks)"
        ]
        if self.compute is not None:
            lines += [
                f"compute, one block: {self.compute.forward_tokens_per_s:.1f} forward tokens/s, "
                f"{self.compute.inference_steps_per_s:.1f} inference steps/s",
                f"average blocks used per request: {average_blocks_used(self.num_blocks):.1f}",
            ]
        if self.network_tokens_per_s is not None:
            lines.append(f"network: {self.network_tokens_per_s:.1f} tokens/s")
        if self.key is not None:
            lines.append(f"measured on: {self.key} at {self.measured_at}")
        return "\n".join(lines)


def resolve_throughput(
    mode: str,
    *,
    num_blocks: int,
    measure: Callable[[], ComputeThroughput],
    cache: ThroughputCache,
    key: str,
    network_tokens_per_s: float | None = None,
    log: logging.Logger = logger,
) -> ThroughputReport:
    """Resolve ``--throughput``: a number is announced as is (nothing measured); ``auto`` uses the
    cached compute figures for ``key`` or measures once; ``eval`` and ``dry_run`` measure and
    overwrite the cache (for ``dry_run`` the caller prints ``summary()`` and exits 0).

    ``measure`` is e.g. ``functools.partial(measure_compute, model_config, device, dtype)``;
    ``network_tokens_per_s`` caps the result (``network_tokens_per_s(bandwidth or
    DEFAULT_BANDWIDTH, hidden_size, wire dtype bytes)``), None for no cap."""
    fixed = _fixed_throughput(mode)
    if fixed is not None:
        log.info("announcing throughput %.2f tokens/s per block as given by --throughput", fixed)
        return ThroughputReport(fixed, "fixed", num_blocks)
    figures, measured_now = cache.get_or_measure(
        key, lambda: _measure_entry(measure), force=mode != "auto", valid=_is_valid_entry
    )
    compute = ComputeThroughput.from_dict(figures)
    measured_at = str(figures.get("measured_at", "an unknown time"))
    verb = "measured" if measured_now else "using cached"
    log.info(
        "%s throughput for %s: %.1f forward tokens/s, %.1f inference steps/s per block (measured at %s; %s)",
        verb,
        key,
        compute.forward_tokens_per_s,
        compute.inference_steps_per_s,
        measured_at,
        cache.path,
    )
    throughput = combine(compute, num_blocks, network_tokens_per_s)
    network = "no cap" if network_tokens_per_s is None else f"network cap {network_tokens_per_s:.1f} tokens/s"
    log.info(
        "announcing throughput %.2f tokens/s per block: %.1f steps/s / %.1f average blocks used of %d, %s",
        throughput,
        compute.inference_steps_per_s,
        average_blocks_used(num_blocks),
        num_blocks,
        network,
    )
    source = "measured" if measured_now else "cached"
    return ThroughputReport(throughput, source, num_blocks, compute, network_tokens_per_s, key, measured_at)


def _fixed_throughput(mode: str) -> float | None:
    if mode in THROUGHPUT_MODES:
        return None
    try:
        value = float(mode)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"--throughput {mode!r} is not valid; use auto, eval, dry_run or a positive number")
    return value


def _measure_entry(measure: Callable[[], ComputeThroughput]) -> dict[str, Any]:
    compute = measure()
    return {**compute.to_dict(), "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}


def _is_valid_entry(entry: dict[str, Any]) -> bool:
    try:
        ComputeThroughput.from_dict(entry)
    except ValueError:
        return False
    return True
