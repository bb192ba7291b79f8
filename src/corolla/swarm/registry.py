"""Reading and writing server records in the DHT.

Coroutines passed to ``DHT.run_coroutine`` run in the DHT's own process, so they are
module-level functions bound with ``functools.partial`` (they must be picklable)."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from corolla.errors import SwarmUnavailable
from corolla.protocol.records import ServerInfo
from corolla.protocol.uids import make_uids
from corolla.swarm.spans import BlockRecords

logger = logging.getLogger(__name__)


async def _store_many(
    _dht: DHT, node: DHTNode, *, uids: list[str], subkey: str, value: Any, expiration_time: float
) -> list[str]:
    results = await node.store_many(
        keys=uids, subkeys=[subkey] * len(uids), values=[value] * len(uids), expiration_time=expiration_time
    )
    return [uid for uid, ok in results.items() if not ok]


async def _get_many(_dht: DHT, node: DHTNode, *, uids: list[str]) -> dict[str, Any]:
    found = await node.get_many(uids, sufficient_expiration_time=float("inf"))  # latest, not cached
    # plain data only: the result travels back through a pipe
    out: dict[str, Any] = {}
    for uid, entry in found.items():
        if entry is not None and isinstance(entry.value, dict):
            out[uid] = {subkey: getattr(sub, "value", None) for subkey, sub in entry.value.items()}
    return out


DHT_TIMEOUT = 30.0  # seconds a DHT operation may take before we give up on it


def _run(dht: DHT, coro: partial, timeout: float) -> Any:
    """Run a coroutine in the DHT process; never block forever (the DHT process may be gone)."""
    future = dht.run_coroutine(coro, return_future=True)
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise SwarmUnavailable(f"the DHT did not answer within {timeout:.0f} s") from None


def announce(
    dht: DHT, dht_prefix: str, info: ServerInfo, expiration: float, *, timeout: float = DHT_TIMEOUT
) -> None:
    """Store ``info`` under every block of its span, subkey = this peer's id."""
    uids = make_uids(dht_prefix, info.start_block, info.end_block)
    failed = _run(
        dht,
        partial(
            _store_many,
            uids=uids,
            subkey=dht.peer_id.to_base58(),
            value=info.to_wire(),
            expiration_time=get_dht_time() + expiration,
        ),
        timeout,
    )
    if failed:
        logger.warning("the DHT did not accept the record for %d block(s), e.g. %s", len(failed), failed[0])


def fetch_block_records(
    dht: DHT, dht_prefix: str, num_blocks: int, *, timeout: float = DHT_TIMEOUT
) -> BlockRecords:
    """Per block index, the valid records found in the DHT (malformed ones are dropped)."""
    uids = make_uids(dht_prefix, 0, num_blocks)
    found = _run(dht, partial(_get_many, uids=uids), timeout)
    out: BlockRecords = []
    for uid in uids:
        records: dict[str, ServerInfo] = {}
        for peer_id, value in found.get(uid, {}).items():
            info = ServerInfo.from_wire(value)
            if info is not None and isinstance(peer_id, str):
                records[peer_id] = info
        out.append(records)
    return out
