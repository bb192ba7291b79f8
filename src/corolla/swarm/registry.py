"""Reading and writing server records in the DHT.

A server stores its record under each hosted block's uid, subkey ``PEER_ID[owner:RSA KEY]``, signed
with its identity (``corolla.swarm.identity``); readers keep only records whose subkey's key is the
peer id's own, keyed by that peer id. Records refused by the DHT's validators (wrong or missing swarm
key, bad signature) never reach this module; ``fetch_block_records`` counts those of another swarm.

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
from corolla.swarm.auth import rejected_records
from corolla.swarm.identity import ServerIdentity, record_owner
from corolla.swarm.spans import BlockRecords

logger = logging.getLogger(__name__)


async def _store_many(
    _dht: DHT, node: DHTNode, *, uids: list[str], subkey: str, value: Any, expiration_time: float
) -> list[str]:
    results = await node.store_many(
        keys=uids, subkeys=[subkey] * len(uids), values=[value] * len(uids), expiration_time=expiration_time
    )
    # results are keyed by (uid, subkey): name the uid only (the subkey holds a whole public key)
    return [key[0] if isinstance(key, tuple) else key for key, ok in results.items() if not ok]


async def _get_many(_dht: DHT, node: DHTNode, *, uids: list[str]) -> tuple[dict[str, Any], int]:
    """The records under ``uids``, and how many records the validators refused meanwhile."""
    rejected_before = rejected_records(node.protocol.record_validator)
    found = await node.get_many(uids, sufficient_expiration_time=float("inf"))  # latest, not cached
    # plain data only: the result travels back through a pipe
    out: dict[str, Any] = {}
    for uid, entry in found.items():
        if entry is not None and isinstance(entry.value, dict):
            out[uid] = {subkey: getattr(sub, "value", None) for subkey, sub in entry.value.items()}
    return out, rejected_records(node.protocol.record_validator) - rejected_before


class FetchedRecords(list):  # type: ignore[type-arg]
    """``BlockRecords`` (per block: peer id -> record), plus counts of what was dropped: ``foreign``
    (at least this many records of another swarm: a missing or different swarm key) and ``unowned``
    (records whose subkey is not signed by the peer id it names)."""

    foreign: int = 0
    unowned: int = 0


def foreign_records_hint(records: BlockRecords, keyed: bool) -> str | None:
    """Why a swarm may look empty: records were there but of another swarm (None when none were)."""
    foreign = getattr(records, "foreign", 0)
    if not foreign:
        return None
    if keyed:
        return (
            f"ignored {foreign} record(s) not signed with this swarm key: from peers without it, "
            "or --swarm_key is not the swarm's key file"
        )
    return f"ignored {foreign} record(s) of a closed swarm: pass its key file with --swarm_key"


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
    dht: DHT,
    dht_prefix: str,
    info: ServerInfo,
    expiration: float,
    *,
    identity: ServerIdentity,
    timeout: float = DHT_TIMEOUT,
) -> None:
    """Store ``info`` under every block of its span, subkey = this server's signed ``identity.subkey``
    (``dht`` must run under ``identity``, which signs the records)."""
    uids = make_uids(dht_prefix, info.start_block, info.end_block)
    failed = _run(
        dht,
        partial(
            _store_many,
            uids=uids,
            subkey=identity.subkey,
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
    """Per block index, the valid records found in the DHT, keyed by their owner's peer id (malformed
    and unsigned ones are dropped; ``.foreign`` counts those of another swarm)."""
    uids = make_uids(dht_prefix, 0, num_blocks)
    found, foreign = _run(dht, partial(_get_many, uids=uids), timeout)
    out = FetchedRecords()
    out.foreign = foreign
    for uid in uids:
        records: dict[str, ServerInfo] = {}
        for subkey, value in found.get(uid, {}).items():
            peer_id = record_owner(subkey)
            if peer_id is None:
                out.unowned += 1
                continue
            info = ServerInfo.from_wire(value)
            if info is not None:
                records[peer_id] = info
        out.append(records)
    return out
