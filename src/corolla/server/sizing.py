"""How much this server takes on: its block count (from memory) and the throughput it announces.

The maths lives in ``corolla.runtime.memory`` / ``corolla.runtime.throughput``; this module feeds
them the server's device, model and peers, logs the outcome, and prints ``dry_run`` figures."""

from __future__ import annotations

import functools
import logging

from hivemind.p2p import P2P

from corolla.config import LimitsConfig, ServerConfig
from corolla.runtime.compute_thread import on_compute_thread
from corolla.runtime.memory import num_blocks_for
from corolla.runtime.throughput import (
    DEFAULT_BANDWIDTH,
    ThroughputCache,
    cache_key,
    measure_compute,
    network_tokens_per_s,
    resolve_throughput,
)
from corolla.server.bandwidth import measure_bandwidth
from corolla.server.plan import ServerPlan

logger = logging.getLogger(__name__)

WIRE_DTYPE_BYTES = 4  # clients send float32 hidden states


def decide_num_blocks(plan: ServerPlan, limits: LimitsConfig) -> int:
    """As many blocks as fit in the device's memory (capped at the model's size)."""
    count = num_blocks_for(
        plan.model_config,
        plan.dtype,
        plan.device,
        limits.attn_cache_tokens,
        limits.max_batch_size,
        quant_type=plan.quant_type,
        tp_devices=plan.tp_devices,
    )
    logger.info("hosting as many blocks as fit: %s", count.reason)
    if plan.device.type == "cpu":
        logger.warning("this server runs on CPU: CPU servers are slow, consider a GPU (--device cuda)")
    return count.num_blocks


async def decide_throughput(
    config: ServerConfig, plan: ServerPlan, num_blocks: int, p2p: P2P, peers: list[str]
) -> float:
    """The figure to announce for ``--throughput``; with ``dry_run`` the figures are printed too."""
    network = None
    if config.fixed_throughput is None:
        network = await _network_tokens_per_s(p2p, peers, plan.model_config.hidden_size)
    measure = functools.partial(
        measure_compute,
        plan.model_config,
        plan.device,
        plan.dtype,
        quant_type=plan.quant_type,
        tp_devices=plan.tp_devices,
    )
    report = await on_compute_thread(  # where the span will run: one OpenMP team per process
        resolve_throughput,
        config.throughput,
        num_blocks=num_blocks,
        measure=measure,
        cache=ThroughputCache(config.cache_dir),
        key=cache_key(
            plan.model_name, plan.device, plan.dtype, plan.quant_type, max(1, len(plan.tp_devices))
        ),
        network_tokens_per_s=network,
    )
    if config.throughput == "dry_run":
        print(report.summary(), flush=True)
    return report.throughput


async def _network_tokens_per_s(p2p: P2P, peers: list[str], hidden_size: int) -> float:
    bandwidth = await measure_bandwidth(p2p, peers[:3])
    if bandwidth is None:
        logger.info(
            "no peer to measure the network against: assuming %.0f Mbit/s", DEFAULT_BANDWIDTH * 8 / 1e6
        )
        bandwidth = DEFAULT_BANDWIDTH
    else:
        logger.info("measured %.0f Mbit/s to a peer of the swarm", bandwidth * 8 / 1e6)
    return network_tokens_per_s(bandwidth, hidden_size, WIRE_DTYPE_BYTES)
