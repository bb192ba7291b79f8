"""A session's KV cache, allocated once for its whole ``max_length``.

transformers' ``DynamicLayer`` concatenates every new key onto the old ones, so each decode step
allocates and copies the whole cache of every layer (about 1 ms per token on the built-in model
at 100-300 positions here, growing with the length). ``PreallocatedLayer`` writes new keys into
a buffer sized for the session and hands out views, so a step allocates nothing for the cache.
Sliding-window layers keep transformers' own layer (their cache is bounded anyway).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer with room for ``max_length`` positions, allocated on first use
    (when the batch size, heads, dtype and device are known)."""

    def __init__(self, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self._keys = key_states.new_zeros((batch, heads, self.max_length, dim))
        self._values = value_states.new_zeros((batch, value_states.shape[1], self.max_length, dim))
        self.device = key_states.device
        self.is_initialized = True
        self._views()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self._keys is not None and self._values is not None
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # past the reservation: grow (the server's checks prevent this)
            self._keys, self._values = _grown(self._keys, end), _grown(self._values, end)
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        assert self._keys is not None and self._values is not None
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def window(self, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views of the first ``length`` positions of the buffers, also those past the cache's own
        length (zeros, or keys of positions rolled back: finite values, for the caller to mask); None
        if the buffers are shorter (for merging sessions' caches in one pass without padding them)."""
        if self._keys is None or self._values is None or length > self._keys.shape[-2]:
            return None
        return self._keys[:, :, :length], self._values[:, :, :length]

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (transformers' convention: negative)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)
            self._views()

    def reset(self) -> None:
        self.length = 0
        super().reset()


def _grown(buffer: torch.Tensor, length: int) -> torch.Tensor:
    extra = buffer.new_zeros((*buffer.shape[:2], length - buffer.shape[2], buffer.shape[3]))
    return torch.cat([buffer, extra], dim=-2)


def session_cache(config: PretrainedConfig, max_length: int | None) -> DynamicCache:
    """A cache for a span described by ``config``: full-attention layers preallocated for
    ``max_length`` positions (None: transformers' growing layers)."""
    cache = DynamicCache(config=config)
    if max_length is not None:
        for index, layer in enumerate(cache.layers):
            if type(layer) is DynamicLayer:
                cache.layers[index] = PreallocatedLayer(max_length)
    return cache
