"""``corolla dht`` / ``python -m corolla.cli.run_dht``: a bootstrap-only peer that hosts no blocks."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

from corolla.cli.args import (
    NETWORK_GROUPS,
    build_parser,
    parse_config,
    report_error,
    route_hivemind_logs,
    setup_logging,
)
from corolla.config import NetworkConfig
from corolla.errors import CorollaError

PROG = "corolla dht"
logger = logging.getLogger(__name__)


def parse_dht_args(argv: Sequence[str] | None = None) -> NetworkConfig:
    parser = build_parser(PROG, "Run a bootstrap-only DHT peer that others join.", NETWORK_GROUPS)
    return parse_config(parser, NetworkConfig, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run until SIGINT/SIGTERM; exit status 0 after a clean shutdown, 2 for any refusal."""
    setup_logging()
    try:
        network = parse_dht_args(argv)
        from corolla.swarm.dht import start_dht, visible_maddrs  # imports hivemind: after parsing
        from corolla.swarm.reachability import check_reachability, reachability_message

        route_hivemind_logs()
        stop = _stop_on_signals()
        reach = check_reachability(
            network.initial_peers, network.listen_maddrs(), network.public_maddrs(),
            skip=network.skip_reachability_check,
        )  # fmt: skip
        # a bootstrap peer does not hide behind relays: others must be able to dial it
        level, message = reachability_message(
            reach, skip=network.skip_reachability_check, relays=False, port=str(network.port or 31337),
            bootstrap=True,
        )
        logger.log(level, "%s", message)
        dht = start_dht(network, reachable=True)
    except CorollaError as error:
        return report_error(PROG, error)
    try:
        _serve_peers(dht, relay=network.use_relay)
        _print_join_line(visible_maddrs(dht), network.swarm_key)
        if network.use_relay:
            logger.info("relaying for peers behind NAT (--no_relay turns it off)")
        stop.wait()
    finally:
        logger.info("shutting down the DHT peer")
        dht.shutdown()
    return 0


def _serve_peers(dht: object, *, relay: bool) -> None:
    """Answer other peers' reachability checks and, with ``relay``, relay for peers behind NAT,
    from a thread of its own."""
    import asyncio

    from corolla.swarm.reachability import DialBackService
    from corolla.swarm.relay_service import RelayService

    async def serve() -> None:
        p2p = await dht.replicate_p2p()  # type: ignore[attr-defined]
        await DialBackService().register(p2p, answer_pings=True)
        if relay:
            await RelayService(p2p).start()
        await asyncio.Event().wait()

    threading.Thread(target=asyncio.run, args=(serve(),), name="corolla-peers", daemon=True).start()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    return stop


def _print_join_line(maddrs: list[str], swarm_key: str | None = None) -> None:
    for maddr in maddrs:
        print(f"multiaddr: {maddr}", flush=True)
    key = f" --swarm_key {swarm_key}" if swarm_key else ""  # a closed swarm: everyone needs the key
    if maddrs:
        print(f"To join this swarm: corolla serve --initial_peers {maddrs[0]}{key}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
