"""Whole-sequence passes through a chain of servers (no cache), with re-routing: forward, and
backward for training (``remote_sequential`` is differentiable with respect to its inputs and
deep prompts; the servers' weights stay frozen).

With ``ClientConfig.verify_fraction`` > 0 a random share of forward passes is verified: each hop is
re-run on another server holding its blocks and compared (``client/verify.py``); when the hop's
server is outvoted, the majority's output is used and the server is excluded from this client's
later passes (``manager.verification`` is the record). Backward passes are not verified.

``RemoteSequential`` is the same as a module (Petals' name): a client model's ``transformer.h``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from corolla.client.manager import SequenceManager
from corolla.client.routing import Hop
from corolla.client.session import InferenceSession, prompts_by_block
from corolla.client.transport import RETRIABLE, call_backward, call_forward
from corolla.client.verify import Opinion, decide, verifier_candidates

logger = logging.getLogger(__name__)

Record = list[tuple[Hop, torch.Tensor]]  # each hop of a pass with the hidden states it was given


def remote_sequential(
    manager: SequenceManager,
    hidden: torch.Tensor,
    *,
    prompts: torch.Tensor | None = None,
    adapter: str | None = None,
    start: int = 0,
    end: int | None = None,
) -> torch.Tensor:
    """Hidden states after every block of the model (or blocks ``start..end-1``). Differentiable
    when autograd needs it: then ``loss.backward()`` runs backward passes on the same servers
    (re-routed if one fails). ``prompts``: deep prompts [num_blocks, batch, prefix, hidden], indexed
    by block number (rows outside ``start..end-1`` are not sent)."""
    end = manager.num_blocks if end is None else end
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or (prompts is not None and prompts.requires_grad)
    )
    if needs_grad:
        return _RemoteChain.apply(hidden, prompts, manager, adapter, start, end)
    out, _ = forward_span(manager, hidden, start, end, prompts, adapter)
    return out.to(hidden.dtype)


class RemoteSequential(nn.Module):
    """Blocks ``start..end-1`` of the swarm as one module, as Petals' ``RemoteSequential``: a client
    model's ``transformer.h`` (``model.layers`` for Llama-like families), so Petals code that calls
    the blocks runs unchanged. ``h(hidden)`` runs them (differentiable, see ``remote_sequential``),
    ``h[3:7]`` and ``h[3]`` are the same for fewer blocks, ``len(h)`` counts them, and
    ``h.inference_session(max_length=N)`` opens a session over them. No weights live here."""

    def __init__(
        self, manager: SequenceManager, start: int = 0, end: int | None = None, *, adapter: str | None = None
    ) -> None:
        super().__init__()
        self.manager, self.adapter = manager, adapter
        self.start, self.end = start, manager.num_blocks if end is None else end

    def forward(self, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden`` [batch, seq, hidden] through these blocks; ``prompts``: deep prompts of these
        blocks [len(self), batch, prefix, hidden]."""
        return remote_sequential(self.manager, hidden, prompts=prompts_by_block(prompts, self.start),
                                 adapter=self.adapter, start=self.start, end=self.end)  # fmt: skip

    def __getitem__(self, index: int | slice) -> RemoteSequential:
        blocks = range(self.start, self.end)[index]
        if isinstance(blocks, int):
            return RemoteSequential(self.manager, blocks, blocks + 1, adapter=self.adapter)
        if blocks.step != 1:
            raise ValueError("remote blocks run in order: a slice of them takes no step")
        return RemoteSequential(self.manager, blocks.start, blocks.stop, adapter=self.adapter)

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[RemoteSequential]:
        return (self[i] for i in range(len(self)))

    def inference_session(self, max_length: int, batch_size: int | None = None) -> InferenceSession:
        """A session over these blocks (servers keep the KV cache); ``with h.inference_session(...) as s:
        s.step(hidden)``. ``batch_size`` defaults to the first step's."""
        return InferenceSession(self.manager, max_length, batch_size, adapter=self.adapter,
                                start=self.start, end=self.end)  # fmt: skip

    def extra_repr(self) -> str:
        return f"blocks {self.start}:{self.end}"


def remote_forward(manager: SequenceManager, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states after every block of the model (no autograd)."""
    return remote_sequential(manager, hidden.detach())


def forward_span(
    manager: SequenceManager,
    hidden: torch.Tensor,
    start: int,
    end: int,
    prompts: torch.Tensor | None,
    adapter: str | None,
) -> tuple[torch.Tensor, Record]:
    """Blocks ``start..end-1`` on ``hidden``; a failed server is banned and its blocks retried on
    another route. Returns the output and what each hop was given (for a backward pass)."""
    position, failures, cause = start, 0, None
    record: Record = []
    verify = manager.verification.sample()
    while position < end:
        distrusted = frozenset(manager.verification.banned)
        hop = manager.route(position, end, cause=cause, mode="throughput", exclude=distrusted)[0]
        try:
            out = _forward(manager, hop, hidden, prompts, adapter)
        except RETRIABLE as e:
            failures += 1
            cause = manager.failed(hop, e, failures)
            continue
        manager.bans.forgive(hop.peer_id)
        if verify:
            hop, out = _verified(manager, hop, hidden, out, prompts, adapter)
        record.append((hop, hidden))
        hidden, position = out, hop.end
    return hidden, record


def _forward(manager: SequenceManager, hop: Hop, hidden: torch.Tensor, prompts: torch.Tensor | None,
             adapter: str | None) -> torch.Tensor:  # fmt: skip
    return manager.loop.run(
        call_forward(
            manager.p2p, manager.peer(hop), hop.start, hop.end, _wire(hidden, hop, manager.config.wire_dtype),
            prompts=_prompts_for(prompts, hop), adapter=adapter, reply_dtype=manager.config.wire_dtype,
        ),  # fmt: skip
        timeout=manager.config.request_timeout,
    )


def _verified(
    manager: SequenceManager,
    hop: Hop,
    hidden: torch.Tensor,
    out: torch.Tensor,
    prompts: torch.Tensor | None,
    adapter: str | None,
) -> tuple[Hop, torch.Tensor]:
    """Re-run ``hop`` on other servers holding its blocks until a majority agrees
    (``verify.decide``); returns a hop of the majority and its output (the given ones unless the
    hop's server was outvoted). Outvoted servers are banned; no majority: ``VerificationError``."""
    report, tolerance = manager.verification, manager.config.verify_tolerance
    hops = {hop.peer_id: hop}
    failed: set[str] = set()

    def ask(heard: frozenset[str]) -> Opinion | None:
        while True:
            exclude = heard | failed | manager.bans.banned() | frozenset(report.banned)
            spans = verifier_candidates(manager.spans(), hop.start, hop.end, exclude=exclude,
                                        adapter=manager.adapter)  # fmt: skip
            if not spans:
                return None
            span = report.choose(spans)
            other = Hop(span.peer_id, hop.start, hop.end, span.info.torch_dtype)
            try:
                result = _forward(manager, other, hidden, prompts, adapter)
            except RETRIABLE as e:
                logger.info("verifier ...%s failed (%s); asking another server", other.peer_id[-8:], e)
                manager.bans.ban(other.peer_id)
                failed.add(other.peer_id)
                continue
            report.add_extra(hidden.shape[1])
            hops[other.peer_id] = other
            return Opinion(other.peer_id, result, other.dtype)

    verdict, opinions = decide([Opinion(hop.peer_id, out, hop.dtype)], ask, tolerance)
    if len(opinions) == 1:
        report.add_unverifiable()
        return hop, out
    losers = report.record(verdict, opinions, step=report.steps, start=hop.start, end=hop.end,
                           tolerance=tolerance)  # fmt: skip
    for peer in losers:
        manager.bans.ban(peer)
    assert verdict.majority is not None
    winner = opinions[verdict.majority[0]]
    return hops[winner.peer_id], winner.output


def backward_span(
    manager: SequenceManager,
    record: Record,
    grad: torch.Tensor,
    prompts: torch.Tensor | None,
    adapter: str | None,
    grad_prompts: torch.Tensor | None,
    failures: int = 0,
) -> torch.Tensor:
    """The gradient of the first hop's inputs, from the gradient of the last hop's outputs; the
    deep prompts' gradients are added into ``grad_prompts``. A server that fails is banned and its
    blocks re-run forward on a new route (to recover that route's inputs), then backward."""
    wire = manager.config.wire_dtype
    for hop, inputs in reversed(record):
        try:
            grad_in, grad_p = manager.loop.run(
                call_backward(
                    manager.p2p, manager.peer(hop), hop.start, hop.end, _wire(inputs, hop, wire),
                    _wire(grad, hop, wire), prompts=_prompts_for(prompts, hop), adapter=adapter,
                    reply_dtype=wire,
                ),  # fmt: skip
                timeout=manager.config.request_timeout,
            )
        except RETRIABLE as e:
            failures += 1
            manager.failed(hop, e, failures)
            _, rerouted = forward_span(manager, inputs, hop.start, hop.end, prompts, adapter)
            grad = backward_span(manager, rerouted, grad, prompts, adapter, grad_prompts, failures)
            continue
        manager.bans.forgive(hop.peer_id)
        if grad_prompts is not None and grad_p is not None:
            grad_prompts[hop.start : hop.end] += grad_p.to(grad_prompts.dtype)
        grad = grad_in
    return grad


class _RemoteChain(torch.autograd.Function):
    """The swarm's blocks as one differentiable function of (hidden states, deep prompts)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None,
        manager: SequenceManager,
        adapter: str | None,
        start: int,
        end: int,
    ) -> torch.Tensor:
        detached = None if prompts is None else prompts.detach()
        out, record = forward_span(manager, hidden.detach(), start, end, detached, adapter)
        ctx.manager, ctx.adapter, ctx.record, ctx.prompts = manager, adapter, record, detached
        ctx.dtype = hidden.dtype
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        prompts: torch.Tensor | None = ctx.prompts
        grad_prompts = None if prompts is None else torch.zeros_like(prompts, dtype=torch.float32)
        grad_in = backward_span(ctx.manager, ctx.record, grad_out, prompts, ctx.adapter, grad_prompts)
        grad_prompts_out = None if grad_prompts is None else grad_prompts.to(prompts.dtype)  # type: ignore[union-attr]
        return grad_in.to(ctx.dtype), grad_prompts_out, None, None, None, None


def _wire(tensor: torch.Tensor, hop: Hop, wire_dtype: str | None = None) -> torch.Tensor:
    """``tensor`` in the dtype activations travel in: ``wire_dtype`` when the client asked for one
    (``ClientConfig.wire_dtype``), else the one the hop's server computes in."""
    return tensor.detach().to(getattr(torch, wire_dtype or hop.dtype))


def _prompts_for(prompts: torch.Tensor | None, hop: Hop) -> torch.Tensor | None:
    return None if prompts is None else _wire(prompts[hop.start : hop.end], hop)
