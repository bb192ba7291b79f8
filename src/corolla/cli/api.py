"""``corolla api [MODEL] --initial_peers …``: serve an OpenAI-compatible API and a web page for the swarm.

Point any OpenAI client at ``http://HOST:PORT/v1`` (any api_key): chat and text completions,
streamed or not, generated through the swarm; ``GET /`` shows the swarm, ``/metrics`` (and
``--metrics_port``) the API's Prometheus metrics. Ctrl-C or SIGTERM stops it."""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

import uvicorn

from corolla.cli.args import client_parser, run_client_command
from corolla.errors import ConfigError

PROG = "corolla api"
GRACEFUL_SHUTDOWN_S = 5  # open streams get this long to end before the server closes them


def build_parser() -> argparse.ArgumentParser:
    p = client_parser(PROG, __doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port to listen on (0: any free port)")
    p.add_argument(
        "--metrics_port",
        type=port_number,
        default=None,
        help="also serve the Prometheus metrics (always at the API's /metrics) on http://HOST:METRICS_PORT/metrics",
    )
    p.add_argument(
        "--max_wait_for_blocks",
        type=float,
        default=5.0,
        help="seconds a request waits for servers of missing blocks before answering 503",
    )
    return p


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError(f"expected a port number (0-65535), got {text!r}")
    return port


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; taken before the model loads, so a busy port fails fast
    (and ``--port 0`` gets a free port whose number can be reported)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def banner(model: str, host: str, port: int, metrics_port: int | None) -> str:
    """The one line saying where the API listens and how to use it."""
    where = f"[{host}]" if ":" in host else host
    url = f"http://{where}:{port}"
    metrics = f"http://{where}:{metrics_port}/metrics" if metrics_port is not None else f"{url}/metrics"
    return (
        f"{PROG}: serving {model} at {url} (web page) | OpenAI clients: base_url={url}/v1, any api_key"
        f" | metrics: {metrics}"
    )


def run(args: argparse.Namespace) -> None:
    if args.max_wait_for_blocks < 0:
        raise ConfigError(f"--max_wait_for_blocks must be >= 0, got {args.max_wait_for_blocks}")
    sock = listen(args.host, args.port)
    try:
        serve(args, sock)
    finally:
        sock.close()


def serve(args: argparse.Namespace, sock: socket.socket) -> None:
    from corolla.api.app import create_app
    from corolla.api.engine import Engine
    from corolla.api.metrics import ApiMetrics

    engine = Engine.load(
        args.model,
        initial_peers=args.initial_peers,
        dht_prefix=args.dht_prefix,
        cache_dir=args.cache_dir,
        max_wait_for_blocks=args.max_wait_for_blocks,
        swarm_key=args.swarm_key,
        identity_path=args.identity_path,
        revision=args.revision,
        token=args.token,
    )
    try:
        metrics = ApiMetrics()
        if args.metrics_port is not None:
            try:
                metrics.serve(args.metrics_port, args.host)
            except OSError as error:
                raise ConfigError(f"cannot serve metrics on port {args.metrics_port}: {error}") from None
        config = uvicorn.Config(
            create_app(engine, metrics=metrics),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        print(banner(args.model, args.host, sock.getsockname()[1], args.metrics_port), flush=True)
        Server(config).run(sockets=[sock])
    finally:
        engine.close()


class Server(uvicorn.Server):
    """uvicorn's server, except that a SIGINT/SIGTERM is not raised again once it has stopped: the
    command then leaves the swarm and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: do not wait for open streams
        self.should_exit = True


def main(argv: Sequence[str] | None = None) -> int:
    return run_client_command(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
