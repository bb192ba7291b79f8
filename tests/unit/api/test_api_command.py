"""``corolla api``'s flags, socket and banner (the command itself runs in the integration tests)."""

from __future__ import annotations

import pytest

from corolla.cli.api import banner, build_parser, listen, main
from corolla.cli.main import COMMANDS
from corolla.errors import ConfigError

PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWExample"


def test_registered_as_a_command() -> None:
    assert COMMANDS["api"][0] == "corolla.cli.api"


def test_defaults() -> None:
    args = build_parser().parse_args(["--initial_peers", PEER])
    assert (args.model, args.host, args.port, args.metrics_port) == ("smollm2-135m", "127.0.0.1", 8000, None)
    assert args.max_wait_for_blocks == 5.0


@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_bad_ports_are_refused(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["--initial_peers", PEER, "--port", port])
    assert caught.value.code == 2 and "expected a port number" in capsys.readouterr().err


def test_a_busy_port_is_one_clear_error() -> None:
    sock = listen("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1"):
            listen("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


def test_a_busy_port_fails_the_command_before_loading_anything(capsys: pytest.CaptureFixture[str]) -> None:
    sock = listen("127.0.0.1", 0)
    try:
        status = main(["/no/such/model", "--initial_peers", PEER, "--port", str(sock.getsockname()[1])])
    finally:
        sock.close()
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("corolla api: error: cannot listen")


def test_banner_says_how_to_point_an_openai_client_at_it() -> None:
    line = banner("smollm2-135m", "127.0.0.1", 8123, None)
    assert "\n" not in line and "base_url=http://127.0.0.1:8123/v1" in line and "api_key" in line
    assert "http://127.0.0.1:8123/metrics" in line
    assert "http://[::1]:8123/v1" in banner("m", "::1", 8123, 9100) and "[::1]:9100/metrics" in banner(
        "m", "::1", 1, 9100
    )
