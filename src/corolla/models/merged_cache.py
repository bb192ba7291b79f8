"""Several sessions' KV caches merged for the decode passes that run them together
(``SpanModel.decode_batch``).

The merge is kept from one pass to the next: while the same sessions keep stepping together (the
usual case: concurrent generations), a pass appends one column to it instead of stacking every
session's cache again (that cost 5 of the 38 ms of a pass of 8 sessions on the built-in model).
Columns are positions; a per-row mask says which columns are a row's: its cache's positions, then
one column per pass. Each session's own cache also gets its new keys, so a session can leave the
group (or step alone) at any time; the merge is rebuilt when the group or any cache changed.

The merge is a second copy of its sessions' keys and values (as the stacking per pass it replaces
was, for the duration of a pass); its owner drops it when one of its sessions is gone."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ROOM = 32  # columns allocated ahead, for that many passes before the merge is rebuilt


class MergedCaches:
    """The merged keys and values of ``caches`` (layers ``first..last-1``) and each row's mask."""

    def __init__(
        self,
        caches: list[DynamicCache],
        first: int,
        last: int,
        config: Any,
        on_session_gone: Callable[[MergedCaches], None] | None = None,
    ) -> None:
        me = weakref.ref(self)

        def gone(_: object) -> None:  # a session closed: its owner may drop the merge (and its memory)
            merge = me()
            if merge is not None and on_session_gone is not None:
                on_session_gone(merge)

        self._sessions = [weakref.ref(cache, gone) for cache in caches]
        self.first, self.last, self.config = first, last, config
        self.lengths = [cache.get_seq_length(first) for cache in caches]
        self.width = max(self.lengths)  # columns in use
        self.layers = {
            index: _stacked([cache.layers[index] for cache in caches], self.width + ROOM)
            for index in range(first, last)
        }
        device = self.layers[first][0].device
        self.visible = torch.arange(self.width + ROOM, device=device)[None, :] < torch.tensor(
            self.lengths, device=device
        ).unsqueeze(1)

    def fits(self, caches: list[DynamicCache], first: int, last: int) -> bool:
        """Whether the next pass of these sessions can use this merge: the same sessions in the same
        order, each cache exactly as the last pass left it, and a free column."""
        return (
            (first, last) == (self.first, self.last)
            and len(caches) == len(self._sessions)
            and all(ref() is cache for ref, cache in zip(self._sessions, caches, strict=True))
            and all(cache.get_seq_length(first) == n for cache, n in zip(caches, self.lengths, strict=True))
            and self.width < self.visible.shape[1]
        )

    def step_cache(self, dtype: torch.dtype) -> tuple[DynamicCache, torch.Tensor]:
        """A cache for one pass whose layers write the new keys into the next free column, and the
        additive attention mask [rows, 1, 1, columns] that shows each row its own columns."""
        column = self.width
        cache = DynamicCache(config=self.config)
        for index, (keys, values) in self.layers.items():
            cache.layers[index] = _ColumnLayer(keys[:, :, : column + 1], values[:, :, : column + 1])
        visible = self.visible[:, : column + 1].clone()
        visible[:, column] = True
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
        return cache, mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None, None, :]

    def commit(self, caches: list[DynamicCache]) -> None:
        """After the pass: the new column belongs to every row, and each session's cache grows by it."""
        new = slice(self.width, self.width + 1)
        for row, cache in enumerate(caches):
            for index, (keys, values) in self.layers.items():
                cache.update(keys[row : row + 1, :, new], values[row : row + 1, :, new], index)
        self.visible[:, new] = True
        self.width += 1
        self.lengths = [n + 1 for n in self.lengths]


class _ColumnLayer(DynamicLayer):
    """One layer's merged keys and values up to the new column, which ``update`` fills in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[:, :, -1:] = key_states
        self.values[:, :, -1:] = value_states
        return self.keys, self.values


def _stacked(layers: list[Any], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Several sessions' keys and values of one layer as [sessions, heads, length, dim] each:
    one concatenation of their preallocated buffers when they all have ``length`` positions of
    room (``PreallocatedLayer.window``; what lies past a session's own length is masked), else
    copied row by row and right-padded with zeros."""
    windows = [layer.window(length) if hasattr(layer, "window") else None for layer in layers]
    if all(w is not None for w in windows):
        keys, values = zip(*windows, strict=True)  # type: ignore[misc]
        return torch.cat(keys), torch.cat(values)
    keys = _right_pad([layer.keys for layer in layers], length)
    return keys, _right_pad([layer.values for layer in layers], length)


def _right_pad(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """[1, heads, n_i, dim] tensors -> [batch, heads, length, dim], zeros after each one's n_i."""
    first = tensors[0]
    out = first.new_empty((len(tensors), first.shape[1], length, first.shape[3]))
    for row, tensor in enumerate(tensors):
        out[row, :, : tensor.shape[2]] = tensor[0]
        out[row, :, tensor.shape[2] :] = 0  # masked, but garbage there could still be NaN
    return out
