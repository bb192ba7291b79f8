"""Inference sessions: one stream per hop of a route, KV caches kept by the servers.

Each hop remembers the hidden states it was sent, so when a server dies mid-session the
blocks it held are re-routed to other servers and the history is replayed there."""

from __future__ import annotations

import contextlib
import logging

import torch

from corolla.client.manager import SequenceManager
from corolla.client.routing import Hop
from corolla.client.transport import InferenceStream
from corolla.errors import CorollaError, ServerUnavailable

logger = logging.getLogger(__name__)


class _HopStream:
    def __init__(self, hop: Hop, stream: InferenceStream) -> None:
        self.hop, self.stream = hop, stream
        self.history: list[torch.Tensor] = []  # inputs sent so far, for replay elsewhere


class InferenceSession:
    """``with model.inference_session(max_length=N) as s:`` — steps hidden states through the swarm."""

    def __init__(self, manager: SequenceManager, max_length: int, batch_size: int = 1) -> None:
        self.manager, self.max_length, self.batch_size = manager, max_length, batch_size
        self.position = 0
        self.token_ids: torch.Tensor | None = None  # tokens of the conversation (used by generate)
        self._hops: list[_HopStream] = []
        self._banned: set[str] = set()
        self.closed = False

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Send hidden states for the next positions through every block; returns the last block's output."""
        if self.closed:
            raise CorollaError("this inference session is closed; open a new one")
        if self.position + hidden.shape[1] > self.max_length:
            raise CorollaError(
                f"the session's max_length {self.max_length} would be exceeded; "
                "open a session with a larger max_length"
            )
        if not self._hops:
            self._hops = self._open(0, self.manager.num_blocks)
        i = 0
        while i < len(self._hops):
            hop = self._hops[i]
            try:
                out = self._send(hop, hidden)
            except ServerUnavailable as e:
                self._replace(i, e)
                continue  # retry the same position on the new hop(s)
            hop.history.append(hidden)
            hidden = out
            i += 1
        self.position += hidden.shape[1]
        return hidden

    def _send(self, hop: _HopStream, hidden: torch.Tensor) -> torch.Tensor:
        timeout = self.manager.config.step_timeout
        return self.manager.loop.run(hop.stream.step(hidden, self.position, timeout), timeout=timeout + 5)

    def _open(self, start: int, end: int) -> list[_HopStream]:
        route = self.manager.route(start, end, banned=frozenset(self._banned))
        return [
            _HopStream(
                hop,
                InferenceStream(
                    self.manager.p2p,
                    self.manager.peer(hop),
                    hop.start,
                    hop.end,
                    self.max_length,
                    self.batch_size,
                ),
            )
            for hop in route
        ]

    def _replace(self, index: int, error: Exception) -> None:
        """Route around a failed hop and replay its history on the replacement servers."""
        failed = self._hops[index]
        if len(self._banned) >= self.manager.config.max_retries * max(1, len(self._hops)):
            raise error
        logger.warning(
            "server ...%s failed (%s); re-routing blocks %d:%d",
            failed.hop.peer_id[-8:],
            error,
            failed.hop.start,
            failed.hop.end,
        )
        self._banned.add(failed.hop.peer_id)
        self._close_streams([failed])
        new_hops = self._open(failed.hop.start, failed.hop.end)
        if failed.history:
            replay = torch.cat(failed.history, dim=1)
            saved, self.position = self.position, 0
            try:
                for hop in new_hops:
                    out = self._send(hop, replay)
                    hop.history.append(replay)
                    replay = out
            finally:
                self.position = saved
        self._hops[index : index + 1] = new_hops

    def _close_streams(self, hops: list[_HopStream]) -> None:
        for hop in hops:
            with contextlib.suppress(Exception):
                self.manager.loop.run(hop.stream.close(), timeout=2)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close_streams(self._hops)
