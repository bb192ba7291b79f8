"""The ``corolla`` console script: ``corolla COMMAND [flags]`` dispatches to one module per command."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from corolla import __version__

# command -> (module with ``main(argv) -> int``, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("corolla.cli.run_server", "host a span of a model's blocks in a swarm"),
    "dht": ("corolla.cli.run_dht", "run a bootstrap-only DHT peer and print its multiaddrs"),
    "generate": ("corolla.cli.generate", "stream an answer to a prompt through the swarm"),
    "demo": ("corolla.cli.demo", "start a private two-server swarm and chat through it"),
    "swarm": ("corolla.cli.swarm_view", "show a swarm's servers and which blocks they cover"),
    "api": ("corolla.cli.api", "serve an OpenAI-compatible API and a web page for the swarm"),
    "keygen": ("corolla.cli.keygen", "write a swarm key (closed swarms) or a peer identity file"),
}


def usage() -> str:
    lines = [f"usage: corolla {{{','.join(COMMANDS)}}} [flags]", "", "commands:"]
    lines += [f"  {name:<10}{description}" for name, (_, description) in COMMANDS.items()]
    lines += ["", "Run 'corolla COMMAND --help' for the flags of a command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "--version":
        print(f"corolla {__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(
            f"corolla: error: unknown command {args[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    return module.main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
