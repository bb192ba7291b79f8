from __future__ import annotations

import pytest

from corolla.cli.args import parse_client_args
from corolla.cli.generate import build_parser

MADDR = "/ip4/127.0.0.1/tcp/31337/p2p/QmTzwLAhSupThNWuLL3RxyNBg3gxXAHkD3vEnGNLf6Z2XN"
QUESTION = "What is the capital of France?"


@pytest.mark.parametrize(
    "argv",
    [
        ["--initial_peers", MADDR, QUESTION],  # as the server's join line prints it
        [QUESTION, "--initial_peers", MADDR],
        ["--initial_peers", MADDR, QUESTION, "--max_new_tokens", "8"],
    ],
)
def test_the_prompt_is_read_wherever_it_stands(argv: list[str]) -> None:
    args = parse_client_args(build_parser(), argv)
    assert (args.prompt, args.initial_peers, args.model) == (QUESTION, [MADDR], "smollm2-135m")


def test_model_and_prompt_around_the_flags_as_a_server_prints_them() -> None:
    args = parse_client_args(build_parser(), ["my-model", "--initial_peers", MADDR, QUESTION])
    assert (args.model, args.prompt, args.initial_peers) == ("my-model", QUESTION, [MADDR])


def test_model_then_prompt_after_several_peers() -> None:
    other = MADDR.replace("31337", "31338")
    args = parse_client_args(build_parser(), ["--initial_peers", MADDR, other, "my-model", QUESTION])
    assert (args.model, args.prompt, args.initial_peers) == ("my-model", QUESTION, [MADDR, other])
