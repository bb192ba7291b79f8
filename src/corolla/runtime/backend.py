"""The one compute thread that owns a span's weights; callers await its results."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import DynamicCache

from corolla.models.span import SpanModel
from corolla.runtime.quantize import quantized_bytes


class SpanBackend:
    """Runs a span of blocks on its device, one request at a time, off the event loop."""

    def __init__(
        self,
        span: SpanModel,
        dtype: torch.dtype,
        device: torch.device,
        *,
        quant_type: str = "none",
        tp_devices: tuple[torch.device, ...] = (),
    ) -> None:
        self.span, self.dtype, self.device = span, dtype, device
        self.quant_type, self.tp_devices = quant_type, tp_devices
        self.weight_bytes = quantized_bytes(span.layers)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corolla-compute")

    @property
    def start(self) -> int:
        return self.span.start

    @property
    def end(self) -> int:
        return self.span.end

    def new_cache(self) -> DynamicCache:
        return self.span.new_cache()

    async def run(
        self, hidden: torch.Tensor, start: int, end: int, cache: DynamicCache | None = None
    ) -> torch.Tensor:
        """Blocks ``start..end-1`` (absolute indices) on ``hidden``; the result is in the server's dtype
        (activations travel in the dtype the server announces)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run_sync, hidden, start, end, cache)

    def _run_sync(
        self, hidden: torch.Tensor, start: int, end: int, cache: DynamicCache | None
    ) -> torch.Tensor:
        with torch.inference_mode():
            x = hidden.to(device=self.device, dtype=self.dtype)
            y = self.span(x, first=start - self.start, last=end - self.start, cache=cache)
            return y.to(device="cpu")

    def crop(self, cache: DynamicCache, length: int) -> None:
        cache.crop(length)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
