"""The config dataclasses on their own; ``tests/unit/cli`` covers how flags reach them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from corolla.config import ClientConfig, LimitsConfig, NetworkConfig, ServerConfig, default_cache_dir
from corolla.errors import ConfigError

MADDR = "/ip4/127.0.0.1/tcp/31337/p2p/QmTzwLAhSupThNWuLL3RxyNBg3gxXAHkD3vEnGNLf6Z2XN"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_peers": (MADDR,), "new_swarm": True}, "--initial_peers and --new_swarm conflict"),
        ({"port": 4000, "host_maddrs": ("/ip4/0.0.0.0/tcp/4000",)}, "--port and --host_maddrs conflict"),
        (
            {"port": 4000, "public_ip": "1.2.3.4", "announce_maddrs": ("/ip4/1.2.3.4/tcp/4000",)},
            "--public_ip and --announce_maddrs conflict",
        ),
        ({"public_ip": "1.2.3.4"}, "--public_ip needs --port"),
        ({"port": 0}, "--port must be between 1 and 65535, got 0"),
        ({"port": 65536}, "--port must be between 1 and 65535, got 65536"),
        ({"port": -5}, "--port must be between 1 and 65535, got -5"),
    ],
)
def test_network_config_refuses(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NetworkConfig(**kwargs)


def test_network_maddrs() -> None:
    assert NetworkConfig().listen_maddrs() == ["/ip4/0.0.0.0/tcp/0"]
    assert NetworkConfig().public_maddrs() == []
    config = NetworkConfig(port=4000, public_ip="1.2.3.4")
    assert config.listen_maddrs() == ["/ip4/0.0.0.0/tcp/4000"]
    assert config.public_maddrs() == ["/ip4/1.2.3.4/tcp/4000"]
    explicit = NetworkConfig(host_maddrs=("/ip4/127.0.0.1/tcp/1",), announce_maddrs=("/ip4/5.6.7.8/tcp/2",))
    assert explicit.listen_maddrs() == ["/ip4/127.0.0.1/tcp/1"]
    assert explicit.public_maddrs() == ["/ip4/5.6.7.8/tcp/2"]


@pytest.mark.parametrize(
    "name",
    [
        "max_batch_size",
        "inference_max_length",
        "attn_cache_tokens",
        "request_timeout",
        "session_timeout",
        "step_timeout",
    ],
)
@pytest.mark.parametrize("value", [0, -1])
def test_limits_must_be_positive(name: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"^--{name} must be positive, got {value}$"):
        LimitsConfig(**{name: value})


@pytest.mark.parametrize("name", ["num_blocks", "update_period", "expiration", "mean_balance_check_period"])
@pytest.mark.parametrize("value", [0, -2])
def test_server_values_must_be_positive(name: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"^--{name} must be positive, got {value}$"):
        ServerConfig(**{name: value})


def test_small_positive_values_are_accepted() -> None:
    limits = LimitsConfig(max_batch_size=1, request_timeout=0.01)
    assert (limits.max_batch_size, limits.request_timeout) == (1, 0.01)
    assert ServerConfig(num_blocks=1, throughput="0.001").fixed_throughput == 0.001


@pytest.mark.parametrize("value", ["0", "-1", "fast", "inf", "nan", ""])
def test_throughput_must_be_a_mode_or_a_positive_number(value: str) -> None:
    with pytest.raises(ConfigError, match="use auto, eval, dry_run or a positive number"):
        ServerConfig(throughput=value)


@pytest.mark.parametrize("mode", ["auto", "eval", "dry_run"])
def test_throughput_modes_have_no_fixed_value(mode: str) -> None:
    assert ServerConfig(throughput=mode).fixed_throughput is None


def test_balance_quality_must_not_be_negative() -> None:
    assert ServerConfig(balance_quality=0).balance_quality == 0
    with pytest.raises(ConfigError, match="--balance_quality must be >= 0"):
        ServerConfig(balance_quality=-0.5)


def test_num_blocks_and_block_indices_conflict() -> None:
    with pytest.raises(ConfigError, match="--num_blocks and --block_indices conflict"):
        ServerConfig(num_blocks=2, block_indices=(0, 2))


@pytest.mark.parametrize("indices", [(3, 3), (4, 2), (-1, 2)])
def test_block_indices_must_be_a_non_empty_range(indices: tuple[int, int]) -> None:
    with pytest.raises(ConfigError, match=rf"--block_indices {indices[0]}:{indices[1]} is empty or negative"):
        ServerConfig(block_indices=indices)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps", "auto"])
def test_known_devices(device: str) -> None:
    assert ServerConfig(device=device).device == device


@pytest.mark.parametrize(("field", "value"), [("device", "tpu"), ("torch_dtype", "float64")])
def test_unknown_device_or_dtype(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"--{field} '{value}' is unknown; use one of auto, "):
        ServerConfig(**{field: value})


def test_record_expiration_defaults_to_twice_the_update_period_at_least_a_minute() -> None:
    assert ServerConfig().record_expiration == 120.0
    assert ServerConfig(update_period=10.0).record_expiration == 60.0
    assert ServerConfig(update_period=45.0).record_expiration == 90.0


def test_explicit_expiration_wins() -> None:
    assert ServerConfig(expiration=15.0).record_expiration == 15.0
    assert ServerConfig(update_period=600.0, expiration=30.0).record_expiration == 30.0


def test_configs_are_frozen() -> None:
    config = ServerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits.max_batch_size = 1  # type: ignore[misc]


def test_replace_revalidates() -> None:
    with pytest.raises(ConfigError, match="--throughput '0' is not valid"):
        dataclasses.replace(ServerConfig(), throughput="0")


def test_defaults() -> None:
    config = ServerConfig()
    assert config.model == "smollm2-135m"
    assert (config.num_blocks, config.block_indices) == (None, None)
    assert config.network == NetworkConfig()
    assert config.limits == LimitsConfig()
    assert (ClientConfig().max_retries, ClientConfig().ban_timeout) == (5, 15.0)


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / "corolla")
    assert ServerConfig().cache_dir == str(tmp_path / "corolla")


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_max_alloc_timeout_must_be_a_finite_number_of_seconds(value: float) -> None:
    with pytest.raises(ConfigError, match=r"^--max_alloc_timeout must be >= 0 seconds"):
        LimitsConfig(max_alloc_timeout=value)


def test_session_limits_default_to_failing_at_once_and_16_sessions_per_peer() -> None:
    limits = LimitsConfig()
    assert (limits.max_alloc_timeout, limits.max_sessions_per_peer) == (0.0, 16)
    assert LimitsConfig(max_alloc_timeout=0).max_alloc_timeout == 0
    with pytest.raises(ConfigError, match=r"^--max_sessions_per_peer must be positive, got 0$"):
        LimitsConfig(max_sessions_per_peer=0)


@pytest.mark.parametrize(
    ("text", "size"),
    [("50GB", 50 * 10**9), ("100GiB", 100 * 2**30), ("1.5 MiB", 3 * 2**19), ("4096", 4096), ("10kb", 10_000)],
)
def test_max_disk_space_sizes(text: str, size: int) -> None:
    assert ServerConfig(max_disk_space=text).max_disk_space_bytes == size


@pytest.mark.parametrize("text", ["lots", "10 parsecs", "-5GB", "0", ""])
def test_max_disk_space_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ConfigError, match="--max_disk_space .* is not a size; use e.g. 50GB"):
        ServerConfig(max_disk_space=text)


def test_the_token_stays_out_of_the_config_repr() -> None:
    assert "hf_secret" not in repr(ServerConfig(token="hf_secret"))
