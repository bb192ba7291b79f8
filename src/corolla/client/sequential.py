"""Whole-sequence forward passes through a chain of servers (no cache), with re-routing."""

from __future__ import annotations

import logging

import torch

from corolla.client.manager import SequenceManager
from corolla.client.transport import RETRIABLE, call_forward

logger = logging.getLogger(__name__)


def remote_forward(manager: SequenceManager, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states after every block of the model; a failed server is banned and its blocks
    are retried on another route."""
    position, failures, cause = 0, 0, None
    while position < manager.num_blocks:
        hop = manager.route(position, cause=cause, mode="throughput")[0]
        try:
            hidden = manager.loop.run(
                call_forward(
                    manager.p2p, manager.peer(hop), hop.start, hop.end, hidden.to(getattr(torch, hop.dtype))
                ),
                timeout=manager.config.request_timeout,
            )
        except RETRIABLE as e:
            failures += 1
            cause = manager.failed(hop, e, failures)
            continue
        manager.bans.forgive(hop.peer_id)
        position = hop.end
    return hidden
