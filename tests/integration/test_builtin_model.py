"""The built-in SmolLM2 model through a real two-server swarm, driven by the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from corolla.cli.local_swarm import LocalServer, start_swarm, stop_all
from corolla.config import BUILTIN_MODEL, default_cache_dir

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


def corolla(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corolla.cli.main", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def builtin_dir() -> Path:
    from corolla.models.resolve import resolve_model

    return resolve_model(BUILTIN_MODEL, default_cache_dir()).path  # converts once, then cached


@pytest.fixture(scope="module")
def two_servers(builtin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalServer]]:
    servers = start_swarm(BUILTIN_MODEL, [(0, 15), (15, 30)], log_dir=tmp_path_factory.mktemp("builtin"))
    yield servers
    stop_all(servers)


def test_generate_answers_paris_with_the_local_token_ids(
    two_servers: list[LocalServer], builtin_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    result = corolla(
        "generate",
        QUESTION,
        "--initial_peers",
        two_servers[0].maddr or "",
        "--json",
        "--max_new_tokens",
        "24",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Paris" in answer["text"]
    assert [(hop["start"], hop["end"]) for hop in answer["route"]] == [(0, 15), (15, 30)]

    local = AutoModelForCausalLM.from_pretrained(builtin_dir, dtype=torch.float32).eval()
    prompt_ids = torch.tensor([answer["prompt_ids"]])
    with torch.no_grad():
        expected = local.generate(prompt_ids, max_new_tokens=24, do_sample=False)
    assert answer["token_ids"] == expected[0, prompt_ids.shape[1] :].tolist()


def test_the_prompt_tuning_example_trains_through_the_swarm(two_servers: list[LocalServer]) -> None:
    example = Path(__file__).parents[2] / "examples" / "prompt_tuning.py"
    result = subprocess.run(
        [sys.executable, str(example), "--initial_peers", two_servers[0].maddr or "", "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = (
        float(line.split("loss ")[1].split(";")[0])
        for line in result.stdout.splitlines()
        if line.startswith(("before:", "after:"))
    )
    assert after < before  # three steps on the pirate answers already lower their loss
    assert "prompt tuning" in result.stderr  # the progress bar
