"""Inference sessions: one stream per hop of a route, KV caches kept by the servers.

Each hop remembers the hidden states it was sent, so when a server dies mid-session the
blocks it held are re-routed to other servers and the history is replayed there."""

from __future__ import annotations

import contextlib
import logging

import torch

from corolla.client.manager import SequenceManager
from corolla.client.routing import Hop
from corolla.client.transport import RETRIABLE, InferenceStream
from corolla.errors import CorollaError
from corolla.protocol.messages import PushTarget

logger = logging.getLogger(__name__)


class _HopStream:
    def __init__(self, hop: Hop, stream: InferenceStream) -> None:
        self.hop, self.stream = hop, stream
        self.history: list[torch.Tensor] = []  # inputs sent so far, for replay elsewhere


class _HopFailed(Exception):
    def __init__(self, hop: _HopStream, error: Exception) -> None:
        super().__init__(str(error))
        self.hop, self.error = hop, error


class InferenceSession:
    """``with model.inference_session(max_length=N) as s:`` — steps hidden states through the swarm."""

    def __init__(
        self, manager: SequenceManager, max_length: int, batch_size: int = 1, *, adapter: str | None = None
    ) -> None:
        self.manager, self.max_length, self.batch_size = manager, max_length, batch_size
        self.adapter = adapter  # the LoRA adapter the servers compute with (None: base weights)
        self.position = 0
        self.prefix_length = 0  # prompt-tuning positions before the first token (set by the model)
        self.prompts: torch.Tensor | None = None  # deep prompts [blocks, batch, prefix, hidden], if any
        self.token_ids: torch.Tensor | None = None  # tokens of the conversation (used by generate)
        self._hops: list[_HopStream] = []
        self._step_id = 0  # one per step; servers run a step once even if it arrives twice (push + copy)
        self.closed = False

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(self, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Send hidden states for the next positions through every block; returns the last block's
        output. Deep ``prompts`` [blocks, batch, prefix, hidden] go with the first step (servers add
        them to positions below ``prefix``); a session with prompts does not use server push."""
        if self.closed:
            raise CorollaError("this inference session is closed; open a new one")
        if self.position + hidden.shape[1] > self.max_length:
            raise CorollaError(
                f"the session's max_length {self.max_length} would be exceeded; "
                "open a session with a larger max_length"
            )
        if prompts is not None:
            self.prompts = prompts.detach()
        if not self._hops:
            self._hops = self._open(0, self.manager.num_blocks)
        self._step_id += 1
        i, failures = 0, 0
        while i < len(self._hops):
            hop = self._hops[i]
            try:
                out = self._send(hop, hidden)
            except RETRIABLE as e:
                failures += 1
                self._replace(i, e, failures)
                continue  # the same position, on the replacement hop(s)
            hop.history.append(hidden)
            self.manager.bans.forgive(hop.hop.peer_id)
            hidden = out
            i += 1
        self.position += hidden.shape[1]
        return hidden

    def _send(self, hop: _HopStream, hidden: torch.Tensor, step_id: int | None = None) -> torch.Tensor:
        timeout = self.manager.config.step_timeout
        step_id = self._step_id if step_id is None else step_id
        dtype = getattr(torch, hop.hop.dtype)
        prompts = None
        if self.prompts is not None and self.position < self.prompts.shape[2]:
            prompts = self.prompts[hop.hop.start : hop.hop.end].to(dtype)
        step = hop.stream.step(hidden.to(dtype), self.position, timeout, step_id, prompts)
        return self.manager.loop.run(step, timeout=timeout + 5)

    def _open(self, start: int, end: int, cause: str | None = None, then: _HopStream | None = None
              ) -> list[_HopStream]:  # fmt: skip
        """Streams for a route over ``start..end-1``; with push on, each server is asked to push its
        outputs to the next one (the last to ``then``, the hop that follows, if any)."""
        hops: list[_HopStream] = []
        for hop in reversed(self.manager.route(start, end, cause=cause)):
            after = hops[0] if hops else then
            push_to = None
            if after is not None and self.manager.config.use_push and self.prompts is None:
                push_to = PushTarget(peer_id=after.hop.peer_id, session_id=after.stream.session_id)
            stream = InferenceStream(self.manager.p2p, self.manager.peer(hop), hop.start, hop.end,
                                     self.max_length, self.batch_size, push_to=push_to,
                                     adapter=self.adapter)  # fmt: skip
            hops.insert(0, _HopStream(hop, stream))
        return hops

    def _replace(self, index: int, error: Exception, failures: int) -> None:
        """Ban the failed server, route its blocks elsewhere and replay their inputs there, so the
        replacement servers hold the same KV cache; retried while servers keep failing."""
        failed = self._hops[index]
        self._close_streams([failed])
        cause = self.manager.failed(failed.hop, error, failures)
        history = torch.cat(failed.history, dim=1) if failed.history else None
        while True:
            then = self._hops[index + 1] if index + 1 < len(self._hops) else None
            new_hops = self._open(failed.hop.start, failed.hop.end, cause=cause, then=then)
            try:
                self._replay(new_hops, history)
                break
            except _HopFailed as f:  # a replacement failed too: ban it and try again
                failures += 1
                self._close_streams(new_hops)
                cause = self.manager.failed(f.hop.hop, f.error, failures)
        logger.info(
            "blocks %d:%d now on %s (replayed %d tokens)",
            failed.hop.start,
            failed.hop.end,
            ", ".join(f"...{h.hop.peer_id[-8:]}" for h in new_hops),
            0 if history is None else history.shape[1],
        )
        self._hops[index : index + 1] = new_hops

    def _replay(self, hops: list[_HopStream], history: torch.Tensor | None) -> None:
        """Send the inputs the failed server had seen through its replacements (positions 0..)."""
        if history is None:
            return
        saved, self.position = self.position, 0
        try:
            for hop in hops:
                try:
                    out = self._send(hop, history, step_id=self._step_id - 1)
                except RETRIABLE as e:
                    raise _HopFailed(hop, e) from e
                hop.history.append(history)
                history = out
        finally:
            self.position = saved

    def _close_streams(self, hops: list[_HopStream]) -> None:
        for hop in hops:
            with contextlib.suppress(Exception):
                self.manager.loop.run(hop.stream.close(), timeout=2)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close_streams(self._hops)
