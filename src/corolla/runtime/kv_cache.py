"""The server's attention-cache budget, counted in token-blocks (tokens x blocks)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from corolla.errors import AllocationFailed


def cache_bytes_per_token_block(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of keys + values one token occupies in one block."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class Reservation:
    token_blocks: int
    released: bool = False


class CacheBudget:
    """Thread-safe accounting: sessions reserve their whole cache up front, release it on close."""

    def __init__(self, total_token_blocks: int) -> None:
        self.total = total_token_blocks
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    @property
    def left(self) -> int:
        return self.total - self._used

    def reserve(self, token_blocks: int) -> Reservation:
        with self._lock:
            if token_blocks > self.total - self._used:
                raise AllocationFailed(
                    f"this server's attention cache cannot hold {token_blocks} more token-blocks "
                    f"({self.total - self._used} of {self.total} free); ask for a shorter max_length "
                    "or use another server"
                )
            self._used += token_blocks
            return Reservation(token_blocks)

    def release(self, reservation: Reservation) -> None:
        with self._lock:
            if not reservation.released:
                reservation.released = True
                self._used -= reservation.token_blocks
