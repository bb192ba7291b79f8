"""Refusals through the real entry points: exit status 2, one line on stderr, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corolla.cli import main as corolla_main
from corolla.cli import run_server

MADDR = "/ip4/127.0.0.1/tcp/31337/p2p/QmTzwLAhSupThNWuLL3RxyNBg3gxXAHkD3vEnGNLf6Z2XN"


def assert_one_line_refusal(stderr: str, prog: str, message: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: "), stderr
    assert message in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--block_indices", "0:999"], "is outside the model"),
        (["--block_indices", "5:5"], "is empty"),
        (["--block_indices", "x"], "expected START:END"),
        (["--torch_dtype", "float16", "--device", "cpu"], "float16 is not supported on CPU"),
        (["--new_swarm", "--initial_peers", MADDR], "conflict"),
        (["--port", "1", "--host_maddrs", "/ip4/0.0.0.0/tcp/1"], "conflict"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_refusals_in_process(
    tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run_server.main([str(tiny_llama_dir), *argv]) == 2
    assert_one_line_refusal(capsys.readouterr().err, "corolla serve", message)


def test_unsupported_model_in_process(unsupported_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_server.main([str(unsupported_dir), "--device", "cpu"]) == 2
    assert_one_line_refusal(capsys.readouterr().err, "corolla serve", "supported families: llama, mistral")


def test_missing_model_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_server.main([str(tmp_path / "no-such-model"), "--device", "cpu"]) == 2
    assert_one_line_refusal(capsys.readouterr().err, "corolla serve", "no-such-model")


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_refused_by_a_real_process(tiny_llama_dir: Path) -> None:
    result = run_module("corolla.cli.run_server", str(tiny_llama_dir), "--device", "cuda")
    assert result.returncode == 2
    assert_one_line_refusal(result.stderr, "corolla serve", "--device cuda: torch")


def test_blocks_outside_the_model_refused_by_a_real_process(tiny_llama_dir: Path) -> None:
    result = run_module("corolla.cli.run_server", str(tiny_llama_dir), "--block_indices", "0:999")
    assert result.returncode == 2
    assert_one_line_refusal(result.stderr, "corolla serve", "has 4 blocks")


def test_conflict_refused_by_the_console_script(tmp_path: Path) -> None:
    result = run_module("corolla.cli.main", "serve", "--num_blocks", "1", "--block_indices", "0:1")
    assert result.returncode == 2
    assert_one_line_refusal(result.stderr, "corolla serve", "--num_blocks and --block_indices conflict")


def test_serve_help_exits_0() -> None:
    result = run_module("corolla.cli.run_server", "--help")
    assert result.returncode == 0
    assert "(default: smollm2-135m)" in result.stdout


def test_corolla_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert corolla_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("serve", "dht", "generate", "demo"):
        assert f"  {name} " in out


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert corolla_main.main(["sevre"]) == 2
    assert_one_line_refusal(capsys.readouterr().err, "corolla", "unknown command 'sevre'")


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert corolla_main.main([]) == 2
    assert "usage: corolla" in capsys.readouterr().err


def test_dht_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    assert corolla_main.main(["dht", "--block_indices", "0:1"]) == 2
    assert_one_line_refusal(capsys.readouterr().err, "corolla dht", "unrecognized arguments")
