"""The one compute thread that owns a span's weights; callers await its results.

Decode steps (one new position of one sequence, with a cache) of concurrent sessions are merged:
while the compute thread is busy, newly arriving steps queue up, and the next pass runs all of
them at once over the weights (``SpanModel.decode_batch``). Before a pass it may wait briefly for
sessions that are about to step (``runtime.batching``), so that concurrent sessions keep stepping
in one pass. A lone session takes the plain path and never waits, so it pays nothing for this.

On CPU, unless ``--num_threads`` fixes it, decode passes compute with the thread count that
measures fastest (``runtime.thread_tuner``); everything else uses every thread."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from transformers import DynamicCache

from corolla.errors import BadRequest
from corolla.models.span import SpanModel
from corolla.runtime import compute_thread
from corolla.runtime.adapters import using_adapter
from corolla.runtime.batching import DecodeRhythms
from corolla.runtime.compute_thread import compute_executor
from corolla.runtime.quantize import quantized_bytes
from corolla.runtime.thread_tuner import ThreadTuner

logger = logging.getLogger(__name__)
T = TypeVar("T")
LOG_MOVES_EVERY = 60.0  # seconds: a change of decode threads is logged at INFO at most this often
MAX_DECODE_BATCH = 32  # decode steps merged into one pass at most


@dataclass
class _DecodeStep:
    hidden: torch.Tensor
    start: int
    end: int
    cache: DynamicCache
    adapter: str | None
    done: asyncio.Future[torch.Tensor]


class SpanBackend:
    """Runs a span of blocks on its device, one request at a time, on the process's compute
    thread (``runtime.compute_thread``), off the event loop."""

    def __init__(
        self,
        span: SpanModel,
        dtype: torch.dtype,
        device: torch.device,
        *,
        quant_type: str = "none",
        tp_devices: tuple[torch.device, ...] = (),
        tune_threads: bool = False,  # on CPU: decode passes' thread count measured (runtime.thread_tuner)
        max_threads: int | None = None,
    ) -> None:
        self.span, self.dtype, self.device = span, dtype, device
        self.quant_type, self.tp_devices = quant_type, tp_devices
        self.adapters: tuple[str, ...] = ()  # LoRA adapters loaded into the span (runtime.adapters)
        self.weight_bytes = quantized_bytes(span.layers)
        self._decode_queue: list[_DecodeStep] = []
        self._draining = False
        self._arrival = asyncio.Event()  # set whenever a decode step is queued
        self.rhythms = DecodeRhythms()
        self.batched_steps = 0  # decode steps that ran merged with others (for tests and metrics)
        self.decode_passes = 0  # passes over the weights for decode steps, merged or alone
        self.compute_seconds = 0.0  # wall time the compute thread spent computing (profiling)
        self.max_threads = max_threads or torch.get_num_threads()  # prompts' count; decode passes' at most
        tune = tune_threads and self.on_cpu and self.max_threads > 1
        self.tuner = ThreadTuner(self.max_threads) if tune else None
        self._moves_logged_at = float("-inf")

    @property
    def start(self) -> int:
        return self.span.start

    @property
    def end(self) -> int:
        return self.span.end

    @property
    def on_cpu(self) -> bool:
        """Whether this span computes with CPU threads (not on an accelerator, not sharded)."""
        return self.device.type == "cpu" and not self.tp_devices

    @property
    def decode_threads(self) -> int | None:
        """The CPU threads decode passes compute with now (None when not computing on CPU)."""
        if not self.on_cpu:
            return None
        return self.tuner.best if self.tuner is not None else self.max_threads

    def new_cache(self, max_length: int | None = None) -> DynamicCache:
        """A session's cache, allocated once for ``max_length`` positions when given."""
        return self.span.new_cache(max_length)

    async def run(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        cache: DynamicCache | None = None,
        *,
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> torch.Tensor:
        """Blocks ``start..end-1`` (absolute indices) on ``hidden``, with deep ``prompts`` and a LoRA
        ``adapter`` if given; the result is in the server's dtype (activations travel in the dtype
        the server announces)."""
        loop = asyncio.get_running_loop()
        if prompts is None and self._is_decode_step(hidden, start, cache):
            assert cache is not None
            step = _DecodeStep(hidden, start, end, cache, adapter, loop.create_future())
            self._decode_queue.append(step)
            self.rhythms.arrived(cache, time.monotonic())
            self._arrival.set()
            if not self._draining:
                self._draining = True
                asyncio.ensure_future(self._drain_decode_queue())
            return await step.done
        call = functools.partial(self._run_sync, hidden, start, end, cache, prompts, adapter)
        if prompts is None and cache is not None and hidden.shape[1] == 1:  # a step that cannot merge
            tuned = functools.partial(self._tuned_pass, call, end - start)
            return await loop.run_in_executor(compute_executor(), self._timed, tuned)
        return await loop.run_in_executor(compute_executor(), self._timed, call, self.max_threads)

    def _is_decode_step(self, hidden: torch.Tensor, start: int, cache: DynamicCache | None) -> bool:
        """One new position of one sequence whose cache already holds its prompt."""
        return (
            cache is not None
            and hidden.shape[:2] == (1, 1)
            and self.span.can_batch_decode
            and cache.get_seq_length(start - self.start) > 0
        )

    async def _drain_decode_queue(self) -> None:
        """Run queued decode steps, merging those of the same blocks and adapter, until none is left."""
        loop = asyncio.get_running_loop()
        free_since = time.monotonic()
        try:
            while self._decode_queue:
                delay = self.rhythms.delay(time.monotonic(), free_since)
                if delay > 0 and len(self._decode_queue) < MAX_DECODE_BATCH:
                    self._arrival.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._arrival.wait(), delay)
                    continue
                taken = self._decode_queue[:MAX_DECODE_BATCH]
                del self._decode_queue[:MAX_DECODE_BATCH]
                groups: dict[tuple[int, int, str | None], list[_DecodeStep]] = {}
                for step in taken:
                    groups.setdefault((step.start, step.end, step.adapter), []).append(step)
                for group in groups.values():
                    try:
                        call = functools.partial(self._decode_sync, group)
                        outs = await loop.run_in_executor(compute_executor(), self._timed, call)
                    except Exception as e:
                        for step in group:
                            if not step.done.done():
                                step.done.set_exception(e)
                        continue
                    now = time.monotonic()
                    for step, out in zip(group, outs, strict=True):
                        self.rhythms.delivered(step.cache, now)
                        if not step.done.done():
                            step.done.set_result(out)
                free_since = time.monotonic()
        finally:
            self._draining = False

    def _decode_sync(self, group: list[_DecodeStep]) -> list[torch.Tensor]:
        first = group[0]
        self.decode_passes += 1
        started = time.monotonic()

        def compute() -> list[torch.Tensor]:
            if len(group) == 1:
                step = first
                return [self._run_sync(step.hidden, step.start, step.end, step.cache, None, step.adapter)]
            self.batched_steps += len(group)
            with torch.inference_mode(), self._adapter(first.adapter):
                hiddens = [s.hidden.to(device=self.device, dtype=self.dtype) for s in group]
                caches = [s.cache for s in group]
                outs = self.span.decode_batch(
                    hiddens, caches, first=first.start - self.start, last=first.end - self.start
                )
                return [out.to(device="cpu") for out in outs]

        try:
            return self._tuned_pass(compute, first.end - first.start)
        finally:
            self.rhythms.passed(time.monotonic() - started)

    def _tuned_pass(self, compute: Callable[[], T], blocks: int) -> T:
        """``compute()``, a decode pass over ``blocks`` blocks, with the tuner's thread count; the
        tuner hears how long it took."""
        started = time.monotonic()
        threads = self.tuner.threads(started) if self.tuner is not None else self.max_threads
        self._use_threads(threads)
        out = compute()
        self._tuned(threads, time.monotonic() - started, blocks)
        return out

    def _use_threads(self, threads: int) -> None:
        """Compute with ``threads`` threads from now on (only when tuning: otherwise never touched)."""
        if self.tuner is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def _tuned(self, threads: int, seconds: float, blocks: int) -> None:
        """Tell the tuner how a decode pass went; log a change of its choice."""
        if self.tuner is None:
            return
        before, now = self.tuner.best, time.monotonic()
        self.tuner.record(threads, seconds / max(1, blocks), now)
        if self.tuner.best == before:
            return
        loud = now - self._moves_logged_at >= LOG_MOVES_EVERY
        if loud:
            self._moves_logged_at = now
        logger.log(
            logging.INFO if loud else logging.DEBUG,
            "decode passes now compute with %d of %d CPU threads: %.1f ms per block against %s "
            "(measured while serving; other work on this machine changes which is faster)",
            self.tuner.best, self.max_threads, 1e3 * (self.tuner.figure or 0.0),
            ", ".join(
                f"{1e3 * median:.1f} ms with {count}"
                for count, median in sorted(self.tuner.medians.items()) if count != self.tuner.best
            ),
        )  # fmt: skip

    async def backward(
        self,
        hidden: torch.Tensor,
        grad_outputs: torch.Tensor,
        start: int,
        end: int,
        *,
        prompts: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gradients of blocks ``start..end-1``'s inputs (and of ``prompts``) given the gradient
        of their outputs: the forward pass is run again with autograd; weights stay frozen and
        nothing is kept between calls."""
        loop = asyncio.get_running_loop()
        call = functools.partial(self._backward_sync, hidden, grad_outputs, start, end, prompts, adapter)
        return await loop.run_in_executor(compute_executor(), self._timed, call, self.max_threads)

    def _run_sync(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        cache: DynamicCache | None,
        prompts: torch.Tensor | None,
        adapter: str | None,
    ) -> torch.Tensor:
        with torch.inference_mode(), self._adapter(adapter):
            x = hidden.to(device=self.device, dtype=self.dtype)
            p = None if prompts is None else prompts.to(device=self.device, dtype=self.dtype)
            y = self.span(x, first=start - self.start, last=end - self.start, cache=cache, prompts=p)
            return y.to(device="cpu")

    def _backward_sync(
        self,
        hidden: torch.Tensor,
        grad_outputs: torch.Tensor,
        start: int,
        end: int,
        prompts: torch.Tensor | None,
        adapter: str | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.enable_grad(), self._adapter(adapter):
            x = hidden.to(device=self.device, dtype=self.dtype).requires_grad_(True)
            inputs = [x]
            p = None
            if prompts is not None:
                p = prompts.to(device=self.device, dtype=self.dtype).requires_grad_(True)
                inputs.append(p)
            y = self.span(x, first=start - self.start, last=end - self.start, prompts=p)
            grad_y = grad_outputs.to(device=y.device, dtype=y.dtype)
            grads = torch.autograd.grad(y, inputs, grad_outputs=grad_y)
        grad_prompts = grads[1].to(device="cpu") if p is not None else None
        return grads[0].to(device="cpu"), grad_prompts

    def _timed(self, call: Callable[[], T], threads: int | None = None) -> T:
        """``call()`` on the compute thread (with ``threads`` threads if given), its wall time added
        to ``compute_seconds``."""
        if threads is not None:
            self._use_threads(threads)
        started = time.perf_counter()
        try:
            return call()
        finally:
            self.compute_seconds += time.perf_counter() - started

    def _adapter(self, name: str | None) -> contextlib.AbstractContextManager[None]:
        """Compute with LoRA adapter ``name`` active (None: the base weights)."""
        if name is None and not self.adapters:
            return contextlib.nullcontext()
        return using_adapter(self.span, name)

    def crop(self, cache: DynamicCache, length: int) -> None:
        """Roll ``cache`` back to its first ``length`` positions (a replayed step). transformers 5's
        ``crop`` takes a negative count of tokens to remove, per layer."""
        for layer in cache.layers:
            excess = layer.get_seq_length() - length
            if excess > 0:
                try:
                    layer.crop(-excess)
                except RuntimeError:  # a sliding-window layer that already dropped those positions
                    raise BadRequest(
                        f"this model's sliding-window cache cannot roll back to position {length}; "
                        "open a new session"
                    ) from None

    def shutdown(self) -> None:
        """At exit: queued work is dropped (the compute thread is the process's, see compute_thread)."""
        compute_thread.shutdown()
