"""Whole-sequence forward passes through a chain of servers (no cache), with re-routing."""

from __future__ import annotations

import logging

import torch

from corolla.client.manager import SequenceManager
from corolla.client.transport import call_forward
from corolla.errors import ServerUnavailable

logger = logging.getLogger(__name__)


def remote_forward(manager: SequenceManager, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states after every block of the model."""
    banned: set[str] = set()
    position = 0
    while position < manager.num_blocks:
        hop = manager.route(position, banned=frozenset(banned))[0]
        timeout = manager.config.request_timeout
        try:
            hidden = manager.loop.run(
                call_forward(manager.p2p, manager.peer(hop), hop.start, hop.end, hidden), timeout=timeout
            )
        except ServerUnavailable as e:
            if len(banned) >= manager.config.max_retries:
                raise
            logger.warning(
                "server ...%s failed (%s); re-routing blocks %d:%d", hop.peer_id[-8:], e, hop.start, hop.end
            )
            banned.add(hop.peer_id)
            continue
        position = hop.end
    return hidden
