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

        route_hivemind_logs()
        stop = _stop_on_signals()
        dht = start_dht(network)
    except CorollaError as error:
        return report_error(PROG, error)
    try:
        _print_join_line(visible_maddrs(dht), network.swarm_key)
        stop.wait()
    finally:
        logger.info("shutting down the DHT peer")
        dht.shutdown()
    return 0


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
