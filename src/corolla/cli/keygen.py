"""``corolla keygen FILE``: write a new swarm key; ``corolla keygen --identity FILE``: a peer identity.

A swarm key (32 random bytes) closes a swarm: give the same file to every server, DHT peer and
client with ``--swarm_key FILE`` (``head -c 32 /dev/urandom > FILE`` makes one too). An identity file
keeps a peer's id across runs (``--identity_path FILE``); this prints the id, the line a server's
``--allowed_peers`` file needs. Neither ever overwrites a key: an existing identity is only read."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from corolla.cli.args import run_client_command

PROG = "corolla keygen"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("file", metavar="FILE", help="where to write the key (refused if it exists)")
    p.add_argument(
        "--identity",
        action="store_true",
        help="write a peer identity instead (or read an existing one) and print its peer id",
    )
    return p


def run(args: argparse.Namespace) -> None:
    if args.identity:
        from corolla.swarm.identity import ServerIdentity

        existed = os.path.exists(args.file)
        identity = ServerIdentity.load_or_create(args.file)
        what = "existing identity" if existed else "new identity written"
        print(f"{identity.peer_id}    # {what}: {args.file} (use with --identity_path)")
        return
    from corolla.swarm.auth import write_swarm_key

    key = write_swarm_key(args.file)
    print(
        f"swarm key written to {args.file} (fingerprint {key.fingerprint}); give it to every peer of "
        "the swarm with --swarm_key and keep it secret"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_client_command(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
