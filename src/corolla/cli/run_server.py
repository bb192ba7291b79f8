"""``corolla serve`` / ``python -m corolla.cli.run_server``: parse, validate, run."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from corolla.cli.args import parse_server_args, route_hivemind_logs, run_command, setup_logging

PROG = "corolla serve"


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 after a clean shutdown, 2 for any refusal, 130 on Ctrl-C."""
    setup_logging()
    return run_command(PROG, lambda: serve(argv))


def serve(argv: Sequence[str] | None) -> None:
    config = parse_server_args(argv)
    from corolla.cli.validate import check_server_config  # heavy (torch, transformers): after parsing

    plan = check_server_config(config)
    from corolla.server.server import run_server

    route_hivemind_logs()
    run_server(config, plan)


if __name__ == "__main__":
    sys.exit(main())
