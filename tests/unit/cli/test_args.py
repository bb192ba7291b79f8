from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

import pytest

from corolla.cli.args import (
    SERVER_GROUPS,
    parse_block_indices,
    parse_server_args,
    server_parser,
    setup_logging,
    split_multiaddr_lists,
)
from corolla.cli.run_dht import parse_dht_args
from corolla.config import LimitsConfig, NetworkConfig, ServerConfig
from corolla.errors import ConfigError

MADDR = "/ip4/127.0.0.1/tcp/31337/p2p/QmTzwLAhSupThNWuLL3RxyNBg3gxXAHkD3vEnGNLf6Z2XN"
CONFLICTS = [
    (["--initial_peers", MADDR, "--new_swarm"], "--initial_peers and --new_swarm conflict"),
    (["--num_blocks", "2", "--block_indices", "0:2"], "--num_blocks and --block_indices conflict"),
    (["--port", "4000", "--host_maddrs", "/ip4/0.0.0.0/tcp/4000"], "--port and --host_maddrs conflict"),
    (
        ["--port", "4000", "--public_ip", "1.2.3.4", "--announce_maddrs", "/ip4/1.2.3.4/tcp/4000"],
        "--public_ip and --announce_maddrs conflict",
    ),
    (["model-a", "--converted_model_name_or_path", "model-b"], "MODEL 'model-a' and --converted_model"),
]


def test_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_server_args(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in [
        "(default: smollm2-135m)",
        "(default: 8192)",
        "(default: 16384)",
        "(default: auto)",
        "(default: 60.0)",
        "(default: as many as fit in memory)",
        "(default: 120.0)",
        "[env var: COROLLA_BLOCK_INDICES]",
        "--config CONFIG_FILE",
    ]:
        assert text in out


def test_every_config_field_is_a_flag() -> None:
    exposed = {f.name for group in SERVER_GROUPS for f in group.fields()}
    expected = {
        f.name
        for cls in (ServerConfig, NetworkConfig, LimitsConfig)
        for f in fields(cls)
        if f.name not in ("network", "limits")
    }
    assert exposed == expected


def test_no_flags_give_the_dataclass_defaults() -> None:
    assert parse_server_args([]) == ServerConfig()


def test_flags_fill_nested_configs() -> None:
    config = parse_server_args(
        ["tiny", "--block_indices", "1:3", "--initial_peers", MADDR, MADDR, "--attn_cache_tokens", "64"]
    )
    assert config.model == "tiny"
    assert config.block_indices == (1, 3)
    assert config.network.initial_peers == (MADDR, MADDR)
    assert config.limits.attn_cache_tokens == 64


def test_a_multiaddr_list_ends_at_the_first_value_that_is_no_multiaddr() -> None:
    config = parse_server_args(["--initial_peers", MADDR, MADDR.replace("31337", "1"), "my-model"])
    assert config.model == "my-model"
    assert config.network.initial_peers == (MADDR, MADDR.replace("31337", "1"))


def test_repeated_list_flags_add_up() -> None:
    config = parse_server_args(
        ["--initial_peers", MADDR, "--adapters", "a", "--initial_peers", MADDR, "--adapters", "b"]
    )
    assert config.network.initial_peers == (MADDR, MADDR)
    assert config.adapters == ("a", "b")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--initial_peers", "/a", "/b", "Hello", "--json"],
            ["--initial_peers=/a", "--initial_peers=/b", "Hello", "--json"],
        ),
        (["--host_maddrs", "/a", "--initial_peers", "/b"], ["--host_maddrs=/a", "--initial_peers=/b"]),
        (
            ["--initial_peers", "not-a-maddr"],
            ["--initial_peers", "not-a-maddr"],
        ),  # the parser says what is wrong
        (["--initial_peers"], ["--initial_peers"]),
        (["x", "--", "--initial_peers", "/a"], ["x", "--", "--initial_peers", "/a"]),
    ],
)
def test_split_multiaddr_lists(argv: list[str], expected: list[str]) -> None:
    assert split_multiaddr_lists(argv) == expected


def test_model_flag_and_positional_agree() -> None:
    assert parse_server_args(["--converted_model_name_or_path", "m"]).model == "m"
    assert parse_server_args(["m", "--converted_model_name_or_path", "m"]).model == "m"


@pytest.mark.parametrize(("argv", "message"), CONFLICTS)
def test_conflicting_pairs_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_server_args(argv)


@pytest.mark.parametrize("text", ["2-4", "a:b", "3", ":4", "1:2:3"])
def test_bad_block_indices_syntax(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--block_indices: expected START:END"):
        parse_server_args(["--block_indices", text])


@pytest.mark.parametrize("text", ["5:5", "4:2"])
def test_empty_block_indices(text: str) -> None:
    with pytest.raises(ConfigError, match="empty"):
        parse_server_args(["--block_indices", text])


def test_parse_block_indices_allows_spaces() -> None:
    assert parse_block_indices(" 0 : 16 ") == (0, 16)


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "abc"],
        ["--no_such_flag"],
        ["--initial_peers"],
        ["--port", "70000"],
        ["--max_batch_size", "0"],
    ],
)
def test_argparse_errors_become_config_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        parse_server_args(argv)


def test_yaml_config_file_sets_flags(tmp_path: Path) -> None:
    path = tmp_path / "serve.yml"
    path.write_text(
        "converted_model_name_or_path: from-yaml\n"
        'block_indices: "10:20"\n'
        "new_swarm: true\n"
        "public_name: yaml server\n"
        "host_maddrs: [/ip4/127.0.0.1/tcp/0, /ip6/::1/tcp/0]\n"
        "step_timeout: 7.5\n"
    )
    config = parse_server_args(["--config", str(path), "--public_name", "cli wins"])
    assert config.model == "from-yaml"
    assert config.block_indices == (10, 20)
    assert config.network.new_swarm is True
    assert config.network.host_maddrs == ("/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0")
    assert config.limits.step_timeout == 7.5
    assert config.public_name == "cli wins"


def test_unknown_yaml_key_is_refused_naming_the_key_the_file_and_the_flag_meant(tmp_path: Path) -> None:
    path = tmp_path / "serve.yml"
    path.write_text("public_name: ok\nnum_blokcs: 3\n")
    with pytest.raises(ConfigError) as error:
        parse_server_args(["--config", str(path)])
    assert str(error.value) == f"unknown key 'num_blokcs' in {path}: did you mean 'num_blocks'?"


def test_a_yaml_key_like_no_flag_points_at_help(tmp_path: Path) -> None:
    path = tmp_path / "serve.yml"
    path.write_text("zzz: 3\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'zzz' in .*serve.yml: keys are flag names without --"
    ):
        parse_server_args(["--config", str(path)])


def test_an_unquoted_yaml_span_read_as_base_60_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "serve.yml"
    path.write_text("block_indices: 10:20\n")  # YAML 1.1 reads 620
    with pytest.raises(ConfigError, match=r"got '620' \(in a YAML file, quote it: '10:20'\)"):
        parse_server_args(["--config", str(path)])


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yml"):
        parse_server_args(["--config", str(tmp_path / "nope.yml")])


def test_env_vars_set_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COROLLA_NUM_BLOCKS", "3")
    monkeypatch.setenv("COROLLA_NEW_SWARM", "true")
    monkeypatch.setenv("COROLLA_HOST_MADDRS", "[/ip4/127.0.0.1/tcp/0, /ip4/127.0.0.1/tcp/1]")
    monkeypatch.setenv("COROLLA_CONVERTED_MODEL_NAME_OR_PATH", "from-env")
    config = parse_server_args(["--new_swarm"])
    assert config.num_blocks == 3
    assert config.network.new_swarm is True
    assert config.network.host_maddrs == ("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/1")
    assert config.model == "from-env"


def test_command_line_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COROLLA_NUM_BLOCKS", "3")
    assert parse_server_args(["--num_blocks", "5"]).num_blocks == 5


def test_bad_env_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COROLLA_NEW_SWARM", "maybe")
    with pytest.raises(ConfigError, match="COROLLA_NEW_SWARM"):
        parse_server_args([])


def test_server_parser_prog() -> None:
    assert server_parser().prog == "corolla serve"


def test_dht_takes_only_network_flags() -> None:
    assert parse_dht_args(["--new_swarm", "--identity_path", "id.key"]) == NetworkConfig(
        new_swarm=True, identity_path="id.key"
    )
    with pytest.raises(ConfigError, match="--num_blocks"):
        parse_dht_args(["--num_blocks", "2"])
    with pytest.raises(ConfigError, match="conflict"):
        parse_dht_args(["--new_swarm", "--initial_peers", MADDR])


@pytest.mark.parametrize(
    ("argv", "relay", "auto_relay"),
    [
        ([], True, True),
        (["--no_relay"], False, True),
        (["--no_auto_relay"], True, False),
        (["--use_relay"], True, True),
        (["--use_relay", "false", "--use_auto_relay=no"], False, False),
        (["--no_relay", "--use_relay"], True, True),  # the last one given wins, as with any flag
    ],
)
def test_relay_switches_as_in_petals(argv: list[str], relay: bool, auto_relay: bool) -> None:
    network = parse_server_args(argv).network
    assert (network.use_relay, network.use_auto_relay) == (relay, auto_relay)
    assert parse_dht_args(argv).use_relay is relay


def test_a_switch_turned_off_in_a_config_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "server.yaml"
    config.write_text("use_relay: false\nskip_reachability_check: true\n")
    network = parse_server_args(["--config", str(config)]).network
    assert network.use_relay is False and network.skip_reachability_check is True
    monkeypatch.setenv("COROLLA_USE_AUTO_RELAY", "false")
    assert parse_server_args([]).network.use_auto_relay is False


def test_a_switch_with_a_value_that_is_no_boolean_is_refused() -> None:
    with pytest.raises(ConfigError, match="--use_relay.*expected true or false"):
        parse_server_args(["--use_relay", "maybe"])


def test_corolla_loglevel_sets_corollas_own_log_level_and_a_bad_value_is_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    corolla = logging.getLogger("corolla")
    before = corolla.level
    try:
        monkeypatch.setenv("COROLLA_LOGLEVEL", "debug")
        setup_logging()
        assert corolla.getEffectiveLevel() == logging.DEBUG
        monkeypatch.setenv("COROLLA_LOGLEVEL", "loud")
        setup_logging()
        assert "ignoring COROLLA_LOGLEVEL=loud: use DEBUG, INFO, WARNING or ERROR" in caplog.text
    finally:
        corolla.setLevel(before)
