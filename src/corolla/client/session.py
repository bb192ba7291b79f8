"""Inference sessions: one stream per hop of a route, KV caches kept by the servers.

Each hop remembers the hidden states it was sent, so when a server dies mid-session the
blocks it held are re-routed to other servers and the history is replayed there.

With ``ClientConfig.verify_fraction`` > 0, a random share of steps is verified: each hop's output is
compared with the output of another server holding the same blocks (a *verifier*: an inference
stream of its own, without push, sent the hop's history when it opens and, on each verified step,
the inputs it has not seen yet). A server outvoted by a majority (``client/verify.py``) is banned
for the session; its blocks and every later hop are re-routed and replayed (their caches may hold
its outputs), and the step goes on there. ``session.verification`` is the record."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from corolla.client.manager import SequenceManager
from corolla.client.routing import Hop
from corolla.client.transport import RETRIABLE, InferenceStream
from corolla.client.verify import Opinion, VerificationError, VerificationReport, decide, verifier_candidates
from corolla.errors import CorollaError
from corolla.protocol.messages import PushTarget

logger = logging.getLogger(__name__)


class _HopStream:
    def __init__(self, hop: Hop, stream: InferenceStream) -> None:
        self.hop, self.stream = hop, stream
        self.history: list[torch.Tensor] = []  # inputs sent so far, for replay elsewhere


@dataclass
class _Early:
    """A verifier's answer for this step, requested alongside the hop's own (``_prefetch``)."""

    verifier: _HopStream
    future: Future[torch.Tensor]
    tokens: int  # sent (catch-up + this step's)
    new: int  # this step's


class _HopFailed(Exception):
    def __init__(self, hop: _HopStream, error: Exception) -> None:
        super().__init__(str(error))
        self.hop, self.error = hop, error


class InferenceSession:
    """``with model.inference_session(max_length=N) as s:`` — steps hidden states through the swarm."""

    def __init__(
        self,
        manager: SequenceManager,
        max_length: int,
        batch_size: int | None = None,
        *,
        adapter: str | None = None,
        start: int = 0,
        end: int | None = None,
    ) -> None:
        self.manager, self.max_length = manager, max_length
        self.batch_size = batch_size  # None: the first step's (servers size their caches by it)
        self.start, self.end = start, manager.num_blocks if end is None else end  # the blocks it runs
        self.adapter = adapter  # the LoRA adapter the servers compute with (None: base weights)
        self.position = 0
        self.prefix_length = 0  # prompt-tuning positions before the first token (set by the model)
        self.prompts: torch.Tensor | None = None  # deep prompts [blocks, batch, prefix, hidden], if any
        self.token_ids: torch.Tensor | None = None  # tokens of the conversation (used by generate)
        self._hops: list[_HopStream] = []
        self._step_id = 0  # one per step; servers run a step once even if it arrives twice (push + copy)
        self.closed = False
        config = manager.config
        self.verification = VerificationReport(config.verify_fraction, config.verify_seed)
        self._verifiers: dict[tuple[int, int], list[_HopStream]] = {}  # verifier streams, per span
        self._agreed: dict[tuple[int, int], list[Opinion]] = {}  # this step's majority, per span
        self._unverifiable: set[tuple[int, int]] = set()  # spans no other server holds (warned once)
        self._early: dict[tuple[int, int], _Early] = {}  # verifiers' requests in flight, per span

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(self, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Send hidden states [batch, new positions, hidden] through every block of the session;
        returns the last block's output. Deep ``prompts`` [blocks, batch, prefix, hidden] go with the
        first step (servers add them to positions below ``prefix``); a session with prompts does not
        use server push. A step of no positions does nothing (Petals' callers make such steps)."""
        if self.closed:
            raise CorollaError("this inference session is closed; open a new one")
        if hidden.shape[1] == 0:
            return hidden.new_empty(hidden.shape)
        if self.position + hidden.shape[1] > self.max_length:
            raise CorollaError(
                f"the session's max_length {self.max_length} would be exceeded; "
                "open a session with a larger max_length"
            )
        if prompts is not None:
            self.prompts = prompts_by_block(prompts.detach(), self.start)
        if not self._hops:
            self.batch_size = self.batch_size or hidden.shape[0]
            self._hops = self._open(self.start, self.end)
        self._step_id += 1
        verify, self._agreed = self.verification.sample(), {}
        try:
            hidden = self._through_hops(hidden, verify)
        finally:
            self._settle_early()
        self.position += hidden.shape[1]
        return hidden

    def _through_hops(self, hidden: torch.Tensor, verify: bool) -> torch.Tensor:
        i, failures = 0, 0
        while i < len(self._hops):
            hop = self._hops[i]
            if verify:
                self._prefetch(hop, hidden)
            try:
                out = self._send(hop, hidden)
            except RETRIABLE as e:
                failures += 1
                self._replace(i, e, failures)
                continue  # the same position, on the replacement hop(s)
            if verify and not self._verified(hop, hidden, out):
                failures += 1
                outvoted = VerificationError("outvoted: its output differs from the majority's")
                self._replace(i, outvoted, failures, tail=True)
                continue
            hop.history.append(hidden)
            self.manager.bans.forgive(hop.hop.peer_id)
            hidden = out
            i += 1
        return hidden

    def _send(self, hop: _HopStream, hidden: torch.Tensor, step_id: int | None = None,
              position: int | None = None) -> torch.Tensor:  # fmt: skip
        """``hidden`` for positions ``position..`` (default: the session's) through ``hop``."""
        timeout = self.manager.config.step_timeout
        return self.manager.loop.run(self._request(hop, hidden, step_id, position), timeout=timeout + 5)

    def _request(self, hop: _HopStream, hidden: torch.Tensor, step_id: int | None = None,
                 position: int | None = None) -> Coroutine[Any, Any, torch.Tensor]:  # fmt: skip
        step_id = self._step_id if step_id is None else step_id
        position = self.position if position is None else position
        dtype = getattr(torch, hop.hop.dtype)
        prompts = None
        if self.prompts is not None and position < self.prompts.shape[2]:
            prompts = self.prompts[hop.hop.start : hop.hop.end].to(dtype)
        wire = getattr(torch, self.manager.config.wire_dtype or hop.hop.dtype)
        return hop.stream.step(hidden.to(wire), position, self.manager.config.step_timeout, step_id, prompts)

    def _open(self, start: int, end: int, cause: str | None = None, then: _HopStream | None = None
              ) -> list[_HopStream]:  # fmt: skip
        """Streams for a route over ``start..end-1``; with push on, each server is asked to push its
        outputs to the next one (the last to ``then``, the hop that follows, if any)."""
        hops: list[_HopStream] = []
        for hop in reversed(self.manager.route(start, end, cause=cause, exclude=self._distrusted())):
            after = hops[0] if hops else then
            push_to = None
            if after is not None and self.manager.config.use_push and self.prompts is None:
                push_to = PushTarget(
                    peer_id=after.hop.peer_id,
                    session_id=after.stream.session_id,
                    addrs=self.manager.addrs_of(after.hop.peer_id),
                )
            stream = InferenceStream(self.manager.p2p, self.manager.peer(hop), hop.start, hop.end,
                                     self.max_length, self.batch_size, push_to=push_to,
                                     adapter=self.adapter,
                                     reply_dtype=self.manager.config.wire_dtype)  # fmt: skip
            hops.insert(0, _HopStream(hop, stream))
        return hops

    def _replace(self, index: int, error: Exception, failures: int, *, tail: bool = False) -> None:
        """Ban the failed server, route its blocks elsewhere and replay their inputs there, so the
        replacement servers hold the same KV cache; retried while servers keep failing. With
        ``tail`` (a server outvoted by verification) every later hop is reopened and replayed too:
        their caches may hold the outvoted server's outputs (pushed to the next server, or from
        steps that were not verified)."""
        self._settle_early()  # a verifier's request in flight must end before streams are closed
        failed = self._hops[index]
        last = len(self._hops) if tail else index + 1
        end = self._hops[last - 1].hop.end
        self._close_streams(self._hops[index:last])
        cause = self.manager.failed(failed.hop, error, failures)
        history = torch.cat(failed.history, dim=1) if failed.history else None
        while True:
            then = self._hops[last] if last < len(self._hops) else None
            new_hops = self._open(failed.hop.start, end, cause=cause, then=then)
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
            end,
            ", ".join(f"...{h.hop.peer_id[-8:]}" for h in new_hops),
            0 if history is None else history.shape[1],
        )
        self._hops[index:last] = new_hops
        # verifiers of later blocks may have been sent the outvoted server's outputs; others of
        # spans no longer on the route are of no use
        spans = {(h.hop.start, h.hop.end) for h in self._hops}
        self._drop_verifiers(lambda v: (tail and v.hop.start >= failed.hop.end)
                             or (v.hop.start, v.hop.end) not in spans)  # fmt: skip

    def _replay(self, hops: list[_HopStream], history: torch.Tensor | None) -> None:
        """Send the inputs the failed server had seen through its replacements (positions 0..)."""
        if history is None:
            return
        for hop in hops:
            try:
                out = self._send(hop, history, step_id=self._step_id - 1, position=0)
            except RETRIABLE as e:
                raise _HopFailed(hop, e) from e
            hop.history.append(history)
            history = out

    # --- verified outputs ------------------------------------------------------------------------

    def _distrusted(self) -> frozenset[str]:
        """Servers outvoted by verification in this session: never routed to again."""
        return frozenset(self.verification.banned)

    def _verified(self, hop: _HopStream, hidden: torch.Tensor, out: torch.Tensor) -> bool:
        """Check ``hop``'s output ``out`` for this step against other servers holding its blocks
        (``verify.decide``). False when a majority outvotes the hop's server (banned for the
        session, reported); verifiers outvoted are banned and dropped. No majority (two servers
        that disagree, no third): ``VerificationError``, and the session is closed."""
        key = (hop.hop.start, hop.hop.end)
        primary = Opinion(hop.hop.peer_id, out, hop.hop.dtype)
        # after a replacement, this step's majority for these blocks is known: no request needed
        known = [o for o in self._agreed.get(key, []) if o.peer_id != primary.peer_id]
        failed: set[str] = set()
        tolerance = self.manager.config.verify_tolerance

        def ask(heard: frozenset[str]) -> Opinion | None:
            return self._ask_verifier(hop, hidden, heard | failed, failed)

        verdict, opinions = decide([primary, *known], ask, tolerance)
        if len(opinions) == 1:
            self.verification.add_unverifiable()
            if key not in self._unverifiable:
                self._unverifiable.add(key)
                logger.warning("verification: no other server holds blocks %d:%d; not verified", *key)
            return True
        try:
            losers = self.verification.record(
                verdict, opinions, step=self._step_id, start=key[0], end=key[1], tolerance=tolerance
            )
        except VerificationError:
            self.close()
            raise
        assert verdict.majority is not None
        self._agreed[key] = [opinions[i] for i in verdict.majority]
        for peer in losers:
            if peer != primary.peer_id:  # an outvoted verifier (the hop's server is banned by _replace)
                self.manager.bans.ban(peer)
                self._drop_verifiers(lambda v, peer=peer: v.hop.peer_id == peer)  # type: ignore[misc]
        return primary.peer_id not in losers

    def _ask_verifier(self, hop: _HopStream, hidden: torch.Tensor, exclude: frozenset[str], failed: set[str]
                      ) -> Opinion | None:  # fmt: skip
        """Another server's output for ``hop``'s blocks on this step: the answer requested alongside
        the hop's own, if any, else from a verifier stream of these blocks (opened on a server picked
        at random if none is usable). None when no other server holds the blocks. A verifier that
        fails is banned and another one asked."""
        early = self._early.pop((hop.hop.start, hop.hop.end), None)
        if early is not None:
            opinion = self._collect(early, failed)
            if opinion is not None and opinion.peer_id not in exclude | {hop.hop.peer_id}:
                return opinion
        while True:
            verifier = self._pick_verifier(hop, exclude | failed)
            if verifier is None:
                return None
            inputs, seen = self._catch_up(verifier, hop, hidden)
            try:
                out = self._send(verifier, inputs, position=seen)
            except RETRIABLE as e:
                self._verifier_failed(verifier, e, failed)
                continue
            self.verification.add_extra(inputs.shape[1])
            return Opinion(verifier.hop.peer_id, out[:, -hidden.shape[1] :], verifier.hop.dtype)

    def _prefetch(self, hop: _HopStream, hidden: torch.Tensor) -> None:
        """Send this step to a verifier of ``hop``'s blocks now, so that it runs alongside the hop's
        own request and verifying costs no extra round trip (``_ask_verifier`` collects it)."""
        key = (hop.hop.start, hop.hop.end)
        if key in self._agreed or key in self._early:
            return
        verifier = self._pick_verifier(hop, frozenset())
        if verifier is None:
            return
        inputs, seen = self._catch_up(verifier, hop, hidden)
        future = asyncio.run_coroutine_threadsafe(
            self._request(verifier, inputs, position=seen), self.manager.loop.loop
        )
        self._early[key] = _Early(verifier, future, inputs.shape[1], hidden.shape[1])

    def _collect(self, early: _Early, failed: set[str]) -> Opinion | None:
        """The answer of a verifier's request in flight; None if it failed (then it is dropped)."""
        try:
            out = early.future.result(timeout=self.manager.config.step_timeout + 5)
        except (*RETRIABLE, TimeoutError) as e:
            early.future.cancel()
            self._verifier_failed(early.verifier, e, failed)
            return None
        self.verification.add_extra(early.tokens)
        return Opinion(early.verifier.hop.peer_id, out[:, -early.new :], early.verifier.hop.dtype)

    def _settle_early(self) -> None:
        """Wait for verifiers' requests of this step that were not used (their hop was replaced):
        their streams must not be left with an answer pending."""
        while self._early:
            _, early = self._early.popitem()
            self._collect(early, set())

    def _pick_verifier(self, hop: _HopStream, exclude: frozenset[str] | set[str]) -> _HopStream | None:
        """A verifier stream for ``hop``'s blocks, in step with the session and not on a server in
        ``exclude``: one already open, else a new one; None when no other server holds the blocks."""
        key = (hop.hop.start, hop.hop.end)
        self._drop_verifiers(lambda v: v.hop == hop.hop)  # its own server: it would check itself
        pool = self._verifiers.setdefault(key, [])
        excluded = frozenset(exclude) | {hop.hop.peer_id} | self._distrusted()
        usable = [v for v in pool if v.hop.peer_id not in excluded and v.stream.position <= self.position]
        if usable:
            return usable[0]
        opened = self._open_verifier(hop.hop, excluded | self.manager.bans.banned())
        if opened is not None:
            pool.append(opened)
        return opened

    def _verifier_failed(self, verifier: _HopStream, error: Exception, failed: set[str]) -> None:
        logger.info("verifier ...%s failed (%s); asking another server", verifier.hop.peer_id[-8:], error)
        self.manager.bans.ban(verifier.hop.peer_id)
        failed.add(verifier.hop.peer_id)
        self._drop_verifiers(lambda v: v is verifier)

    def _open_verifier(self, hop: Hop, exclude: frozenset[str]) -> _HopStream | None:
        """A stream (no push) on a server holding all of ``hop``'s blocks, picked at random among
        those not in ``exclude``; None when there is none."""
        spans = verifier_candidates(self.manager.spans(), hop.start, hop.end, exclude=exclude,
                                    adapter=self.manager.adapter)  # fmt: skip
        if not spans:
            return None
        span = self.verification.choose(spans)
        vhop = Hop(span.peer_id, hop.start, hop.end, span.info.torch_dtype)
        stream = InferenceStream(self.manager.p2p, self.manager.peer(vhop), hop.start, hop.end,
                                 self.max_length, self.batch_size, adapter=self.adapter,
                                 reply_dtype=self.manager.config.wire_dtype)  # fmt: skip
        logger.debug("verifier for blocks %d:%d: ...%s", hop.start, hop.end, span.peer_id[-8:])
        return _HopStream(vhop, stream)

    def _catch_up(self, verifier: _HopStream, hop: _HopStream, hidden: torch.Tensor
                  ) -> tuple[torch.Tensor, int]:  # fmt: skip
        """What a verifier is sent for this step, in one request, and from which position: the
        hop's inputs it has not seen yet (all of them when it is new), then this step's."""
        seen = verifier.stream.position
        if seen >= self.position:
            return hidden, seen
        past = torch.cat([h.to(hidden.dtype) for h in hop.history], dim=1)[:, seen:]
        return torch.cat([past, hidden], dim=1), seen

    def _drop_verifiers(self, which: Callable[[_HopStream], bool]) -> None:
        """Close and forget the verifier streams ``which`` selects."""
        for key, pool in list(self._verifiers.items()):
            dropped = [v for v in pool if which(v)]
            if dropped:
                self._close_streams(dropped)
                self._verifiers[key] = [v for v in pool if not which(v)]

    def _close_streams(self, hops: list[_HopStream]) -> None:
        for hop in hops:
            with contextlib.suppress(Exception):
                self.manager.loop.run(hop.stream.close(), timeout=2)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close_streams(self._hops)
            self._close_streams([v for pool in self._verifiers.values() for v in pool])
            self._verifiers.clear()


def prompts_by_block(prompts: torch.Tensor | None, start: int) -> torch.Tensor | None:
    """Deep prompts of blocks ``start..`` indexed by block number, as hops take them: zero rows for
    the blocks before ``start`` (never sent). Differentiable."""
    if prompts is None or start == 0:
        return prompts
    return torch.cat([prompts.new_zeros(start, *prompts.shape[1:]), prompts])
