"""The composition root of ``corolla serve``: join the swarm, size and place a span, load it,
announce it, serve RPCs, revisit the placement, and leave cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
import time

import torch
from hivemind import DHT
from hivemind.p2p import P2P

from corolla import __version__
from corolla.config import ServerConfig
from corolla.errors import CorollaError, format_ranges
from corolla.models.resolve import default_dht_prefix
from corolla.protocol.records import MAX_ADDRS, ServerInfo, ServerState
from corolla.runtime.adapters import load_adapters
from corolla.runtime.backend import SpanBackend
from corolla.runtime.compute_thread import on_compute_thread
from corolla.runtime.kv_cache import CacheBudget, cache_bytes_per_token_block
from corolla.runtime.loader import load_span, span_checkpoint_names
from corolla.server.handler import Handler, Hosting
from corolla.server.metrics import (
    MetricsState,
    ServerMetrics,
    metrics_host,
    start_metrics_server,
    stop_metrics_server,
)
from corolla.server.placement import Span, rebalance_target, settle_span, swarm_spans
from corolla.server.plan import ServerPlan
from corolla.server.sessions import SessionTable
from corolla.server.sizing import decide_num_blocks, decide_throughput
from corolla.swarm.auth import AccessPolicy, bind_swarm_key, describe, load_allowed_peers, load_swarm_key
from corolla.swarm.dht import rejoin, routing_table_size, start_dht, visible_maddrs
from corolla.swarm.identity import ServerIdentity
from corolla.swarm.maddrs import circuit_addrs, peer_of
from corolla.swarm.reachability import (
    DialBackService,
    check_reachability,
    check_relayed,
    reachability_message,
)
from corolla.swarm.registry import announce
from corolla.swarm.relay_service import RelayService
from corolla.swarm.relays import keep_reservations

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE = 1.5  # seconds in-flight requests get to finish after SIGTERM
SHUTDOWN_STEP = 1.5  # the most one shutdown step may take (the whole shutdown stays under 5 s)


def run_server(config: ServerConfig, plan: ServerPlan) -> None:
    """Run until SIGINT/SIGTERM (or, with ``--throughput dry_run``, until measured)."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
        logger.info("computing with %d CPU threads (--num_threads)", config.num_threads)
    server = Server(config, plan)
    try:
        asyncio.run(server.serve())
    finally:
        if server.identity is not None:
            server.identity.discard()  # a temporary identity file, if joining never read it


class Server:
    def __init__(self, config: ServerConfig, plan: ServerPlan) -> None:
        self.config, self.plan = config, plan
        self.dht_prefix = config.dht_prefix or default_dht_prefix(plan.model_name, config.revision)
        self.model_blocks: int = plan.model_config.num_hidden_layers
        self.metrics = ServerMetrics()
        self.threads = torch.get_num_threads()  # read before decode passes may lower the compute thread's
        self.metrics.watch(self._metrics_state)
        # read before anything starts: a bad key, peer list or identity file is refused at once
        self.access = AccessPolicy(
            swarm_key=load_swarm_key(config.network.swarm_key),
            allowed_peers=load_allowed_peers(config.allowed_peers),
        )
        # signs our records; without --identity_path a fresh one, made just before the DHT starts
        # (its temporary file lives only until the daemon has read it)
        path = config.network.identity_path
        self.identity: ServerIdentity | None = ServerIdentity.load_or_create(path) if path else None
        self.handler = Handler(
            config.limits,
            dht_prefix=self.dht_prefix,
            hidden_size=plan.model_config.hidden_size,
            metrics=self.metrics,
            access=self.access,
        )
        self.throughput = 0.0
        self.span: Span | None = None
        self.addrs: tuple[str, ...] = ()  # where peers can dial us, announced in our record
        self.stop = asyncio.Event()
        self.rng = random.Random()
        self.relayed = False  # reachable only through relays (set when joining)
        self.relaying = False  # relays for peers behind NAT (set when joining)
        self.dial_back = DialBackService()  # answers other peers' reachability checks

    async def serve(self) -> None:
        port = self.config.metrics_port
        if port is None or self.config.throughput == "dry_run":
            return await self._serve()
        # before joining the swarm or loading anything: a port in use is refused at once
        httpd = start_metrics_server(self.metrics, port, metrics_host(self.config.network.listen_maddrs()))
        try:
            await self._serve()
        finally:
            stop_metrics_server(httpd)

    async def _serve(self) -> None:
        self._install_signal_handlers()
        t0 = time.monotonic()
        dht = await asyncio.to_thread(self._join_swarm)
        self.me = dht.peer_id.to_base58()
        direct = [maddr.rsplit("/p2p/", 1)[0] for maddr in visible_maddrs(dht)]
        circuits = circuit_addrs(list(self.config.network.initial_peers)) if self.relayed else []
        self.addrs = tuple(dict.fromkeys(circuits + direct))[:MAX_ADDRS]  # relays first: the rest is private
        try:
            p2p = await dht.replicate_p2p()
            bind_swarm_key(p2p, self.access.swarm_key)  # our calls (pushes, pings) carry proofs
            await self.handler.register(p2p)  # early: peers measuring bandwidth get answers
            await self.dial_back.register(p2p)
            if self.relaying:
                await RelayService(p2p).start()
            if circuits:
                await self._check_relayed(p2p, circuits)
            length = self._span_length()
            self.throughput = await self._throughput(dht, p2p, length)
            if self.config.throughput == "dry_run":
                return
            span = await self._place(dht, length)
            await self._host(dht, span)
            self._log_ready(dht, time.monotonic() - t0)
            tasks = [asyncio.create_task(self._reannounce(dht))]
            if self.relayed:  # renew our relay slots: a relay that restarts forgets them
                tasks.append(asyncio.create_task(keep_reservations(p2p, self.config.network.initial_peers)))
            if self._movable():
                tasks.append(asyncio.create_task(self._rebalance(dht)))
            await self.stop.wait()
            for task in tasks:
                task.cancel()
            await self._shutdown(dht, p2p)
        finally:
            dht.shutdown()
        logger.info("server stopped")

    # --- start-up -----------------------------------------------------------------------------

    def signer(self) -> ServerIdentity:
        """The identity our records are signed with (set once the DHT peer has started)."""
        assert self.identity is not None, "records are announced only after joining the DHT"
        return self.identity

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
        for line in describe(self.access, self.config.allowed_peers):
            logger.info("%s", line)
        reach = check_reachability(
            network.initial_peers, network.listen_maddrs(), network.public_maddrs(),
            skip=network.skip_reachability_check,
        )  # fmt: skip
        behind_nat = reach is not None and reach.direct is False
        self.relayed = behind_nat and network.use_relay and network.use_auto_relay
        self.relaying = network.use_relay and not behind_nat
        level, message = reachability_message(
            reach, skip=network.skip_reachability_check, relays=self.relayed, port=str(network.port or 31337)
        )
        logger.log(level, "%s", message)
        if self.identity is None:
            self.identity = ServerIdentity.load_or_create(None)
        dht = start_dht(
            network, num_workers=max(4, self.model_blocks), identity=self.identity, reachable=not behind_nat
        )
        logger.info("joined the DHT as peer %s", dht.peer_id.to_base58())
        return dht

    async def _check_relayed(self, p2p: P2P, circuits: list[str]) -> None:
        started = time.monotonic()
        if await check_relayed(p2p, self.config.network.initial_peers, circuits):
            logger.info(
                "reachable through relays: a relay dialed back through %s in %.1f s",
                circuits[0], time.monotonic() - started,
            )  # fmt: skip
        else:
            logger.warning(
                "no relay could dial this server back through %s: clients outside this network may not "
                "reach it; check that the --initial_peers are public corolla peers with relays on",
                " or ".join(circuits),
            )  # fmt: skip

    def _span_length(self) -> int:
        cfg = self.config
        if cfg.block_indices is not None:
            return cfg.block_indices[1] - cfg.block_indices[0]
        if cfg.num_blocks is not None:
            return min(cfg.num_blocks, self.model_blocks)
        return decide_num_blocks(self.plan, cfg.limits)

    async def _throughput(self, dht: DHT, p2p: P2P, length: int) -> float:
        peers = [
            s.peer_id for s in await asyncio.to_thread(swarm_spans, dht, self.dht_prefix, self.model_blocks)
        ]
        # servers first, then the initial peers (a new swarm's only other peer may be `corolla dht`)
        initial = [p for p in map(peer_of, self.config.network.initial_peers) if p]
        candidates = [p for p in dict.fromkeys(peers + initial) if p != self.me]
        return await decide_throughput(self.config, self.plan, length, p2p, candidates)

    def _movable(self) -> bool:
        return self.config.block_indices is None and self.config.balance_quality > 0

    async def _place(self, dht: DHT, length: int) -> Span:
        if self.config.block_indices is not None:
            logger.info("hosting blocks %d:%d as requested by --block_indices", *self.config.block_indices)
            await asyncio.to_thread(self._announce, dht, ServerState.JOINING, self.config.block_indices)
            return self.config.block_indices
        if length >= self.model_blocks:
            logger.info("hosting all %d blocks of the model", self.model_blocks)
            await asyncio.to_thread(self._announce, dht, ServerState.JOINING, (0, self.model_blocks))
            return 0, self.model_blocks

        def announce_state(state: ServerState, span: Span) -> None:
            self._announce(dht, state, span)

        return await settle_span(dht, self.dht_prefix, self.model_blocks, length, self.me, announce_state)

    async def _host(self, dht: DHT, span: Span) -> None:
        """Fetch ``span``'s weights (a hub model), load it, start serving it, announce it ONLINE."""
        await asyncio.to_thread(self._fetch, *span)
        backend = await on_compute_thread(self._load, *span)  # the thread that will serve it
        budget = CacheBudget(self.config.limits.attn_cache_tokens * (span[1] - span[0]))
        self.handler.hosting = Hosting(backend, SessionTable(budget))
        self.span = span
        await asyncio.to_thread(self._announce, dht, ServerState.ONLINE, span)

    def _fetch(self, start: int, end: int) -> None:
        """Bring in the bytes of the span's tensors when the model comes from the hub in part."""
        plan = self.plan
        if plan.model is not None and plan.model.hub is not None:
            names = span_checkpoint_names(plan.model_path, plan.model_config, start, end)
            plan.model.fetch(
                names, what=f"blocks {start}:{end}", max_disk_space=self.config.max_disk_space_bytes
            )

    def _load(self, start: int, end: int) -> SpanBackend:
        plan = self.plan
        torch.set_num_threads(self.threads)  # the last span's decode passes may have used fewer
        where = " + ".join(str(d) for d in plan.tp_devices) or str(plan.device)
        quant = "" if plan.quant_type == "none" else f", weights quantised to {plan.quant_type}"
        logger.info(
            "loading blocks %d:%d of %s (%s) on %s in %s%s",
            start, end, plan.model_name, plan.model_path, where, str(plan.dtype).removeprefix("torch."),
            quant,
        )  # fmt: skip
        t0 = time.monotonic()
        span = load_span(
            plan.model_path, plan.model_config, start, end, dtype=plan.dtype, device=plan.device,
            quant_type=plan.quant_type, tp_devices=plan.tp_devices,
        )  # fmt: skip
        cache = (
            cache_bytes_per_token_block(plan.model_config, plan.dtype) * self.config.limits.attn_cache_tokens
        )
        backend = SpanBackend(
            span, plan.dtype, plan.device, quant_type=plan.quant_type, tp_devices=plan.tp_devices,
            tune_threads=self.config.num_threads is None,  # --num_threads fixes the count
            max_threads=self.threads,
        )  # fmt: skip
        if backend.tuner is not None:
            logger.info(
                "decode passes compute with 1 to %d CPU threads, whichever measures fastest while serving "
                "(other work on this machine changes which; --num_threads N fixes the count)",
                backend.max_threads,
            )
        if plan.adapters:
            backend.adapters = tuple(load_adapters(span, plan.adapters, dtype=plan.dtype, device=plan.device))
            logger.info("serving LoRA adapters: %s", ", ".join(backend.adapters))
        logger.info(
            "loaded %d blocks in %.1f s: weights %s, attention cache budget %s (%d tokens x %d blocks)",
            end - start, time.monotonic() - t0, _human(backend.weight_bytes), _human(cache * (end - start)),
            self.config.limits.attn_cache_tokens, end - start,
        )  # fmt: skip
        return backend

    def _log_ready(self, dht: DHT, elapsed: float) -> None:
        assert self.span is not None
        maddrs = visible_maddrs(dht)
        for maddr in maddrs:
            logger.info("listening on %s", maddr)
        blocks = format_ranges(list(range(*self.span)))
        logger.info(
            "ready: serving blocks %s of %s as %s (started in %.1f s)",
            blocks, self.plan.model_name, self.dht_prefix, elapsed,
        )  # fmt: skip
        # behind NAT our own addresses are private: others join through our initial peers
        peers = " ".join(self.config.network.initial_peers[:1] if self.relayed else maddrs[:1])
        if self.config.network.swarm_key:  # a closed swarm: everyone needs the key
            peers += f" --swarm_key {self.config.network.swarm_key}"
        model = "" if self.config.model == ServerConfig.model else f" {self.config.model}"
        print(
            f"Join this swarm: corolla serve{model} --initial_peers {peers}   |   "
            f'client: corolla generate{model} --initial_peers {peers} "What is the capital of France?"',
            file=sys.stdout,
            flush=True,
        )

    def _metrics_state(self) -> MetricsState:
        """The state gauges' values; runs in the metrics HTTP thread at each scrape."""
        hosting = self.handler.hosting
        if hosting is None:
            return MetricsState(throughput=self.throughput)
        backend, sessions = hosting.backend, hosting.sessions
        return MetricsState(
            active_sessions=len(sessions),
            cache_tokens_used=sessions.budget.used,
            cache_tokens_free=sessions.budget.left,
            span=(backend.start, backend.end),
            dtype=str(backend.dtype).removeprefix("torch."),
            quant_type=backend.quant_type,
            throughput=self.throughput,
        )

    # --- announcements and rebalancing --------------------------------------------------------

    def _record(self, state: ServerState, span: Span) -> ServerInfo:
        hosting = self.handler.hosting
        tokens = self.config.limits.attn_cache_tokens
        if state == ServerState.ONLINE and hosting is not None:
            tokens = hosting.sessions.budget.left // (span[1] - span[0])
        return ServerInfo(
            state=state,
            start_block=span[0],
            end_block=span[1],
            throughput=self.throughput,
            torch_dtype=str(self.plan.dtype).removeprefix("torch."),
            quant_type=self.plan.quant_type,
            tensor_parallel=max(1, len(self.plan.tp_devices)),
            adapters=tuple(name for name, _ in self.plan.adapters),
            public_name=self.config.public_name,
            version=__version__,
            max_inference_length=self.config.limits.inference_max_length,
            cache_tokens_left=tokens,
            pinned=self.config.block_indices is not None,
            addrs=self.addrs,
        )

    def _announce(self, dht: DHT, state: ServerState, span: Span, *, timeout: float | None = None) -> None:
        kwargs = {} if timeout is None else {"timeout": timeout}
        announce(
            dht, self.dht_prefix, self._record(state, span), self.config.record_expiration,
            identity=self.signer(), **kwargs,
        )  # fmt: skip
        logger.info("announced blocks %d:%d as %s", *span, state.name)

    async def _reannounce(self, dht: DHT) -> None:
        while True:
            await asyncio.sleep(self.config.update_period)
            if self.span is None or self.handler.hosting is None:
                continue  # moving: the move announces for itself
            try:
                initial = self.config.network.initial_peers
                if initial and await asyncio.to_thread(routing_table_size, dht) == 0:
                    # alone in our DHT: the peers we knew left or restarted; join through the initial ones
                    answered = await asyncio.to_thread(rejoin, dht, initial)
                    logger.info("lost every DHT neighbour: %d initial peers answered a rejoin", answered)
                record = self._record(ServerState.ONLINE, self.span)
                await asyncio.to_thread(
                    announce, dht, self.dht_prefix, record, self.config.record_expiration,
                    identity=self.signer(),
                )  # fmt: skip
            except Exception as e:  # the DHT may be briefly unreachable; try again next period
                logger.warning("re-announcement failed: %s", e)

    async def _rebalance(self, dht: DHT) -> None:
        """Every ``--mean_balance_check_period`` (randomised) seconds, move if the swarm gains enough."""
        period = self.config.mean_balance_check_period
        while True:
            await asyncio.sleep(self.rng.uniform(0.5 * period, 1.5 * period))
            try:
                target = await asyncio.to_thread(
                    rebalance_target, dht, self.dht_prefix, self.model_blocks, self.me,
                    self.config.balance_quality, self.rng,
                )  # fmt: skip
            except Exception as e:
                logger.warning("rebalancing check failed: %s", e)
                continue
            if target is not None and target != self.span:
                await self._move(dht, target)

    async def _move(self, dht: DHT, target: Span) -> None:
        """Leave the old span (announce OFFLINE; its sessions get a clear error), host the new one."""
        old = self.span
        assert old is not None
        logger.info(
            "moving from blocks %d:%d to %d:%d: the swarm's weakest blocks gain from it", *old, *target
        )
        try:  # the new span's weights first, while the old one still serves
            await asyncio.to_thread(self._fetch, *target)
        except CorollaError as e:
            logger.warning("not moving: %s", e)
            return
        self.handler.hosting = None  # requests meanwhile: ServerUnavailable, clients re-route
        self.span = None
        await asyncio.to_thread(self._announce, dht, ServerState.OFFLINE, old)
        await asyncio.to_thread(self._announce, dht, ServerState.JOINING, target)
        await self._host(dht, target)
        logger.info("now serving blocks %s", format_ranges(list(range(*target))))

    # --- shutdown -----------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            if sig == signal.SIGINT:  # a second Ctrl-C: the user does not want to wait
                logger.info("received SIGINT again: exiting at once")
                logging.shutdown()
                os._exit(130)  # the DHT process and p2pd follow (corolla.swarm.lifeline)
            return
        logger.info("received %s: announcing OFFLINE and shutting down", signal.Signals(sig).name)
        self.stop.set()

    async def _shutdown(self, dht: DHT, p2p: P2P) -> None:
        """Announce OFFLINE, let in-flight requests end, close everything; each step is bounded,
        since the P2P daemon may already be gone (a terminal's Ctrl-C reaches it too)."""
        self.handler.stopping.set()  # new requests are refused, waiting sessions get a clear error
        asyncio.get_running_loop().set_exception_handler(_quiet_connection_errors)
        hosting, span = self.handler.hosting, self.span
        sessions = len(hosting.sessions) if hosting is not None else 0
        steps = [
            ("remove RPC handlers", self.handler.unregister(p2p)),
            ("close the dial-back probe", self.dial_back.shutdown()),
            ("close P2P", p2p.shutdown()),
        ]
        if span is not None:
            offline = asyncio.to_thread(self._announce, dht, ServerState.OFFLINE, span, timeout=SHUTDOWN_STEP)
            grace = asyncio.sleep(min(SHUTDOWN_GRACE, 0.2 + 0.1 * sessions))
            steps = [("announce OFFLINE", offline), ("let in-flight requests end", grace), *steps]
        for what, step in steps:
            try:
                await asyncio.wait_for(step, timeout=SHUTDOWN_STEP)
            except Exception as e:
                logger.warning("shutdown: could not %s (%s)", what, type(e).__name__)
        if hosting is not None:
            hosting.backend.shutdown()


def _quiet_connection_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """While shutting down, hivemind's background tasks fail when its daemon is already gone
    (a terminal's Ctrl-C reaches it too): log that quietly instead of printing tracebacks."""
    if isinstance(context.get("exception"), ConnectionError):
        logger.debug("during shutdown: %s", context.get("message"))
    else:
        loop.default_exception_handler(context)


def _human(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    power = 0
    while n >= 1024 and power < len(units) - 1:
        n, power = n / 1024, power + 1
    return f"{int(n)} B" if power == 0 else f"{n:.1f} {units[power]}"
