"""Servers that choose their own blocks: spreading out, rebalancing, measuring throughput."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.config import ClientConfig
from corolla.lab.local_swarm import LOOPBACK, LocalServer, stop_all
from corolla.swarm.spans import coverage

NUM_BLOCKS = 30


def server(model: Path, peer: LocalServer, prefix: str, log_dir: Path, *args: str) -> LocalServer:
    return LocalServer(
        [str(model), "--initial_peers", peer.maddr or "", "--host_maddrs", LOOPBACK, "--dht_prefix", prefix,
         "--throughput", "1", *args],
        log_dir=log_dir, name=f"{prefix}-{len(list(log_dir.iterdir()))}",
    )  # fmt: skip


def spans_of(client, refresh: bool = True) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    return [(s.start, s.end) for s in client.manager.spans(refresh=refresh)]


def client_for(model: Path, peer: LocalServer, prefix: str, **config: float):  # type: ignore[no-untyped-def]
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(model), initial_peers=[peer.maddr], dht_prefix=prefix, client_config=ClientConfig(**config)
    )


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.parametrize("together", [False, True], ids=["one-after-another", "at-the-same-moment"])
def test_three_servers_with_num_blocks_10_cover_all_30_blocks(
    tiny30_dir: Path, dht_peer: LocalServer, tmp_path: Path, together: bool
) -> None:
    prefix = f"spread-{together}"
    servers: list[LocalServer] = []
    try:
        for _ in range(3):
            servers.append(server(tiny30_dir, dht_peer, prefix, tmp_path, "--num_blocks", "10"))
            if not together:
                servers[-1].wait_ready()
        for s in servers:
            s.wait_ready()
        model = client_for(tiny30_dir, dht_peer, prefix)
        try:
            spans = spans_of(model)
            assert len(spans) == 3 and all(end - start == 10 for start, end in spans)
            assert coverage(model.manager.spans(), NUM_BLOCKS) == [1] * NUM_BLOCKS, spans
        finally:
            model.manager.shutdown()
    finally:
        stop_all(servers)


def test_uncovered_blocks_get_covered_by_rebalancing_while_a_client_generates(
    tiny30_dir: Path,
    dht_peer: LocalServer,
    tmp_path: Path,
    local30,  # type: ignore[no-untyped-def]
) -> None:
    prefix = "rebalance"
    movable = server(tiny30_dir, dht_peer, prefix, tmp_path, "--num_blocks", "10",
                     "--mean_balance_check_period", "2")  # fmt: skip
    servers = [movable]
    try:
        movable.wait_ready()  # an empty swarm: it takes 0:10
        servers.append(server(tiny30_dir, dht_peer, prefix, tmp_path, "--block_indices", "0:10"))
        servers.append(server(tiny30_dir, dht_peer, prefix, tmp_path, "--block_indices", "10:20"))
        for s in servers:
            s.wait_ready()
        model = client_for(tiny30_dir, dht_peer, prefix, max_wait_for_blocks=60.0)
        ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(7))
        result: dict[str, torch.Tensor] = {}

        def generate() -> None:  # starts while blocks 20-29 are uncovered, ends after the move
            with torch.no_grad():
                result["tokens"] = model.generate(ids, max_new_tokens=12, do_sample=False)

        worker = threading.Thread(target=generate)
        worker.start()
        try:
            wait_for(lambda: coverage(model.manager.spans(refresh=True), NUM_BLOCKS).count(0) == 0, 60,
                     "blocks 20-29 to be covered")  # fmt: skip
            worker.join(60)
            assert not worker.is_alive()
            with torch.no_grad():
                expected = local30.generate(ids, max_new_tokens=12, do_sample=False)
            assert torch.equal(result["tokens"], expected)
            # the movable server ends on the blocks nobody held (if it checked before the pinned
            # 10:20 server was up, it first moved there, then on to 20:30)
            assert re.search(r"moving from blocks \d+:\d+ to 20:30", movable.log_path.read_text())
        finally:
            model.manager.shutdown()
    finally:
        stop_all(servers)


@pytest.fixture(scope="module")
def local30(tiny30_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny30_dir, dtype=torch.float32).eval()


def corolla_serve(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corolla.cli.main", "serve", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_throughput_dry_run_prints_figures_and_a_later_auto_start_reuses_them(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    dry = corolla_serve(
        str(tiny_gqa_dir), "--throughput", "dry_run", "--cache_dir", str(cache), "--new_swarm",
        "--host_maddrs", LOOPBACK,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert re.search(r"throughput", dry.stdout, re.I) and re.search(r"\d", dry.stdout)
    assert (cache / "throughput.json").exists()

    auto = server(
        tiny_gqa_dir, dht_peer, "reuse", tmp_path, "--cache_dir", str(cache), "--throughput", "auto"
    )
    try:
        auto.wait_ready()
        log = auto.log_path.read_text()
        assert re.search(r"using cached throughput", log, re.I), log
        assert not re.search(r"measuring compute", log, re.I)
    finally:
        auto.stop()


def test_serve_without_block_flags_picks_a_block_count_and_says_why(
    tiny30_dir: Path, dht_peer: LocalServer, tmp_path: Path
) -> None:
    s = server(tiny30_dir, dht_peer, "auto-count", tmp_path)
    try:
        s.wait_ready()
        log = s.log_path.read_text()
        assert re.search(r"blocks? fit", log), log
        assert "CPU servers are slow" in log
    finally:
        s.stop()
