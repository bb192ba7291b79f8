"""``corolla swarm [MODEL] --initial_peers …``: print the servers of a swarm and which blocks they cover."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from corolla.cli.args import client_parser, run_client_command
from corolla.config import NetworkConfig
from corolla.errors import ConfigError, ModelNotFound

PROG = "corolla swarm"


def build_parser() -> argparse.ArgumentParser:
    p = client_parser(PROG, __doc__)
    p.add_argument(
        "--num_blocks",
        type=positive_int,
        default=None,
        help="the model's number of blocks (default: from its config); "
        "with --dht_prefix, MODEL need not be present here",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (one line) instead of the table"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the DHT's answer")
    return p


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def swarm_layout(
    model: str, dht_prefix: str | None, num_blocks: int | None, cache_dir: str, revision: str | None = None,
    token: str | None = None,
) -> tuple[str, int]:  # fmt: skip
    """The model's DHT prefix and number of blocks; the model is read only for what the flags leave out."""
    if dht_prefix is not None and num_blocks is not None:
        return dht_prefix, num_blocks
    from corolla.models.resolve import default_dht_prefix

    name, layers = model_layout(model, cache_dir, revision, token)
    return dht_prefix or default_dht_prefix(name, revision), num_blocks or layers


def model_layout(
    model: str, cache_dir: str, revision: str | None = None, token: str | None = None
) -> tuple[str, int]:
    """(canonical name, number of blocks); the built-in model's are known without converting it."""
    from corolla.models.builtin import find_builtin
    from corolla.models.resolve import resolve_model

    spec = find_builtin(model)
    if spec is not None and spec.num_layers > 0:
        return spec.name, spec.num_layers
    try:
        resolved = resolve_model(model, cache_dir, revision=revision, token=token)
    except ModelNotFound as error:
        raise ModelNotFound(f"{error}; or give --dht_prefix and --num_blocks to skip reading it") from None
    return resolved.name, num_layers(resolved.path)


def num_layers(path: Path) -> int:
    """The model's ``num_hidden_layers``: from config.json when it is there (importing transformers
    takes seconds), else from the transformers config."""
    from corolla.models.resolve import load_config

    layers = _layers_from_json(path) or getattr(load_config(path), "num_hidden_layers", None)
    if not isinstance(layers, int) or layers <= 0:
        raise ModelNotFound(f"the config in {path} has no num_hidden_layers; give --num_blocks")
    return layers


def _layers_from_json(path: Path) -> int | None:
    """``num_hidden_layers`` read straight from config.json, or None."""
    try:
        layers = json.loads((path / "config.json").read_text()).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return None
    return layers if isinstance(layers, int) and layers > 0 else None


def run(args: argparse.Namespace) -> None:
    network = NetworkConfig(
        initial_peers=tuple(args.initial_peers), swarm_key=args.swarm_key, identity_path=args.identity_path
    )
    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout}")
    dht_prefix, num_blocks = swarm_layout(
        args.model, args.dht_prefix, args.num_blocks, args.cache_dir, args.revision, args.token
    )

    from corolla.swarm.dht import start_dht  # imports hivemind: after the cheap checks
    from corolla.swarm.registry import fetch_block_records, foreign_records_hint
    from corolla.swarm.view import build_view, render_text, to_json

    dht = start_dht(network, client_mode=True)
    try:
        records = fetch_block_records(dht, dht_prefix, num_blocks, timeout=args.timeout)
    finally:
        dht.shutdown()
    view = build_view(records, dht_prefix, num_blocks)
    print(json.dumps(to_json(view)) if args.json else render_text(view))
    hint = foreign_records_hint(records, keyed=args.swarm_key is not None)
    if hint and not view.servers:  # an empty view may be a closed swarm seen without its key
        print(f"{PROG}: note: {hint}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    return run_client_command(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
