"""The composition root of ``corolla serve``: join the swarm, load a span, announce it, serve RPCs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

from hivemind import DHT
from hivemind.p2p import P2P

from corolla import __version__
from corolla.config import ServerConfig
from corolla.errors import format_ranges
from corolla.models.resolve import default_dht_prefix
from corolla.protocol.records import ServerInfo, ServerState
from corolla.runtime.backend import SpanBackend
from corolla.runtime.kv_cache import CacheBudget, cache_bytes_per_token_block
from corolla.runtime.loader import load_span, parameter_bytes
from corolla.server.handler import Handler
from corolla.server.plan import ServerPlan
from corolla.server.sessions import SessionTable
from corolla.swarm.balance import block_throughputs, choose_span
from corolla.swarm.dht import start_dht, visible_maddrs
from corolla.swarm.registry import announce, fetch_block_records
from corolla.swarm.spans import spans_from_records

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE = 1.5  # seconds in-flight requests get to finish after SIGTERM
SHUTDOWN_STEP = 1.5  # the most one shutdown step may take (the whole shutdown stays under 5 s)


def run_server(config: ServerConfig, plan: ServerPlan) -> None:
    """Run until SIGINT/SIGTERM."""
    asyncio.run(Server(config, plan).serve())


class Server:
    def __init__(self, config: ServerConfig, plan: ServerPlan) -> None:
        self.config, self.plan = config, plan
        self.dht_prefix = config.dht_prefix or default_dht_prefix(plan.model_name)
        self.num_blocks: int = plan.model_config.num_hidden_layers
        self.stop = asyncio.Event()

    async def serve(self) -> None:
        self._install_signal_handlers()
        t0 = time.monotonic()
        dht = await asyncio.to_thread(self._join_swarm)
        try:
            start, end = await asyncio.to_thread(self._pick_blocks, dht)
            await asyncio.to_thread(self._announce, dht, ServerState.JOINING, start, end, None)
            backend = await asyncio.to_thread(self._load, start, end)
            budget = CacheBudget(self.config.limits.attn_cache_tokens * (end - start))
            sessions = SessionTable(budget)
            handler = Handler(
                backend,
                sessions,
                self.config.limits,
                dht_prefix=self.dht_prefix,
                hidden_size=self.plan.model_config.hidden_size,
            )
            p2p = await dht.replicate_p2p()
            await handler.register(p2p)
            await asyncio.to_thread(self._announce, dht, ServerState.ONLINE, start, end, budget)
            self._log_ready(dht, start, end, time.monotonic() - t0)
            reannounce = asyncio.create_task(self._reannounce(dht, start, end, budget))
            await self.stop.wait()
            reannounce.cancel()
            await self._shutdown(dht, p2p, handler, backend, start, end)
        finally:
            dht.shutdown()
        logger.info("server stopped")

    # --- start-up -----------------------------------------------------------------------------

    def _join_swarm(self) -> DHT:
        network = self.config.network
        if network.initial_peers:
            logger.info("joining the swarm through %d initial peer(s)", len(network.initial_peers))
        elif network.new_swarm:
            logger.info("starting a new private swarm (--new_swarm)")
        else:
            logger.info(
                "no --initial_peers given: starting a new private swarm "
                "(there is no public swarm to join; others join this one with its address)"
            )
        dht = start_dht(network, num_workers=max(4, self.num_blocks))
        logger.info("DHT peer id %s", dht.peer_id.to_base58())
        return dht

    def _pick_blocks(self, dht: DHT) -> tuple[int, int]:
        cfg = self.config
        if cfg.block_indices is not None:
            start, end = cfg.block_indices
            logger.info("hosting blocks %d:%d as requested by --block_indices", start, end)
            return start, end
        if cfg.num_blocks is None or cfg.num_blocks >= self.num_blocks:
            logger.info("hosting all %d blocks (no --num_blocks/--block_indices given)", self.num_blocks)
            return 0, self.num_blocks
        spans = spans_from_records(
            fetch_block_records(dht, self.dht_prefix, self.num_blocks),
            states=(ServerState.JOINING, ServerState.ONLINE),
        )
        start, end = choose_span(block_throughputs(spans, self.num_blocks), cfg.num_blocks)
        logger.info(
            "hosting blocks %d:%d: the least-served span of %d blocks among %d known server(s)",
            start,
            end,
            cfg.num_blocks,
            len(spans),
        )
        return start, end

    def _load(self, start: int, end: int) -> SpanBackend:
        plan = self.plan
        logger.info(
            "loading blocks %d:%d of %s (%s) on %s in %s",
            start,
            end,
            plan.model_name,
            plan.model_path,
            plan.device,
            str(plan.dtype).removeprefix("torch."),
        )
        t0 = time.monotonic()
        span = load_span(plan.model_path, plan.model_config, start, end, dtype=plan.dtype, device=plan.device)
        weights = parameter_bytes(span)
        cache = (
            cache_bytes_per_token_block(plan.model_config, plan.dtype) * self.config.limits.attn_cache_tokens
        )
        logger.info(
            "loaded %d blocks in %.1f s: weights %s, attention cache budget %s (%d tokens x %d blocks)",
            end - start,
            time.monotonic() - t0,
            _human(weights),
            _human(cache * (end - start)),
            self.config.limits.attn_cache_tokens,
            end - start,
        )
        return SpanBackend(span, plan.dtype, plan.device)

    def _log_ready(self, dht: DHT, start: int, end: int, elapsed: float) -> None:
        maddrs = visible_maddrs(dht)
        for maddr in maddrs:
            logger.info("listening on %s", maddr)
        logger.info(
            "ready: serving blocks %s of %s as %s (started in %.1f s)",
            format_ranges(list(range(start, end))),
            self.plan.model_name,
            self.dht_prefix,
            elapsed,
        )
        peers = " ".join(maddrs[:1])
        model = "" if self.config.model == ServerConfig.model else f" {self.config.model}"
        print(
            f"Join this swarm: corolla serve{model} --initial_peers {peers}   |   "
            f'client: corolla generate{model} --initial_peers {peers} "Hello"',
            file=sys.stdout,
            flush=True,
        )

    # --- announcements ------------------------------------------------------------------------

    def _record(self, state: ServerState, start: int, end: int, budget: CacheBudget | None) -> ServerInfo:
        left = budget.left // (end - start) if budget is not None else self.config.limits.attn_cache_tokens
        return ServerInfo(
            state=state,
            start_block=start,
            end_block=end,
            throughput=self.config.throughput,
            torch_dtype=str(self.plan.dtype).removeprefix("torch."),
            public_name=self.config.public_name,
            version=__version__,
            max_inference_length=self.config.limits.inference_max_length,
            cache_tokens_left=left,
        )

    def _announce(
        self, dht: DHT, state: ServerState, start: int, end: int, budget: CacheBudget | None
    ) -> None:
        announce(dht, self.dht_prefix, self._record(state, start, end, budget), self.config.record_expiration)
        logger.info("announced blocks %d:%d as %s", start, end, state.name)

    async def _reannounce(self, dht: DHT, start: int, end: int, budget: CacheBudget) -> None:
        while True:
            await asyncio.sleep(self.config.update_period)
            try:
                await asyncio.to_thread(
                    announce,
                    dht,
                    self.dht_prefix,
                    self._record(ServerState.ONLINE, start, end, budget),
                    self.config.record_expiration,
                )
            except Exception as e:  # the DHT may be briefly unreachable; try again next period
                logger.warning("re-announcement failed: %s", e)

    # --- shutdown -----------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        # hivemind forks the DHT process from here: the child must not inherit these handlers,
        # or it ignores the SIGTERM that ends it when its graceful shutdown times out
        os.register_at_fork(after_in_child=_default_signal_handlers)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            return
        logger.info("received %s: announcing OFFLINE and shutting down", signal.Signals(sig).name)
        self.stop.set()

    async def _shutdown(
        self, dht: DHT, p2p: P2P, handler: Handler, backend: SpanBackend, start: int, end: int
    ) -> None:
        """Announce OFFLINE, let in-flight requests end, close everything; each step is bounded,
        since the P2P daemon may already be gone (a terminal's Ctrl-C reaches it too)."""
        handler.stopping.set()  # new requests are refused, waiting sessions get a clear error
        offline = self._record(ServerState.OFFLINE, start, end, None)
        steps = [
            (
                "announce OFFLINE",
                asyncio.to_thread(
                    announce,
                    dht,
                    self.dht_prefix,
                    offline,
                    self.config.record_expiration,
                    timeout=SHUTDOWN_STEP,
                ),
            ),
            (
                "let in-flight requests end",
                asyncio.sleep(min(SHUTDOWN_GRACE, 0.2 + 0.1 * len(handler.sessions))),
            ),
            ("remove RPC handlers", handler.unregister(p2p)),
            ("close P2P", p2p.shutdown()),
        ]
        for what, step in steps:
            try:
                await asyncio.wait_for(step, timeout=SHUTDOWN_STEP)
                if what == "announce OFFLINE":
                    logger.info("announced blocks %d:%d as OFFLINE", start, end)
            except Exception as e:
                logger.warning("shutdown: could not %s (%s)", what, type(e).__name__)
        backend.shutdown()


def _default_signal_handlers() -> None:
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
