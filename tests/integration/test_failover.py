"""Servers die mid-generation (SIGKILL) or vanish: the output stays exactly what it would have been."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import StoppingCriteria

from corolla import AutoDistributedModelForCausalLM
from corolla.config import ClientConfig
from corolla.errors import MissingBlocks
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all

FAST_FAILURE = ClientConfig(step_timeout=10.0, max_wait_for_blocks=20.0)


class KillAt(StoppingCriteria):
    """After ``tokens`` new tokens, SIGKILL the server that the session uses for block ``block``."""

    def __init__(self, session, servers: list[LocalServer], block: int, prompt: int, tokens: int) -> None:  # type: ignore[no-untyped-def]
        self.session, self.servers, self.block = session, servers, block
        self.at = prompt + tokens
        self.killed_peer: str | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        if self.killed_peer is None and input_ids.shape[1] >= self.at:
            hop = next(h for h in self.session.route if h.start <= self.block < h.end)
            victim = next(s for s in self.servers if s.maddr and s.maddr.endswith(hop.peer_id))
            victim.kill()
            victim.process.wait(10)
            self.killed_peer = hop.peer_id
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def client(model_dir: Path, peer: LocalServer, prefix: str, config: ClientConfig = FAST_FAILURE):  # type: ignore[no-untyped-def]
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(model_dir), initial_peers=[peer.maddr], dht_prefix=prefix, client_config=config
    )


def swarm(model_dir: Path, peer: LocalServer, prefix: str, splits: list[tuple[int, int]], log_dir: Path
          ) -> list[LocalServer]:  # fmt: skip
    return start_swarm(str(model_dir), splits, initial_peers=[peer.maddr or ""], log_dir=log_dir,
                       extra_args=["--dht_prefix", prefix, "--throughput", "1"])  # fmt: skip


@pytest.fixture(scope="module")
def expected_200(local_model) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return ids, local_model.generate(ids, max_new_tokens=200, do_sample=False)


@pytest.mark.parametrize(
    ("splits", "killed_block"),
    [([(0, 6), (0, 6)], 0), ([(0, 3), (3, 6), (3, 6)], 4)],
    ids=["full-replica", "part-of-the-chain"],
)
def test_sigkill_mid_generation_gives_the_undisturbed_tokens(
    tiny_gqa_dir: Path,
    dht_peer: LocalServer,
    tmp_path: Path,
    expected_200,
    splits,
    killed_block,  # type: ignore[no-untyped-def]
) -> None:
    prefix = f"kill-{len(splits)}"
    servers = swarm(tiny_gqa_dir, dht_peer, prefix, splits, tmp_path)
    model = client(tiny_gqa_dir, dht_peer, prefix)
    ids, expected = expected_200
    try:
        with torch.no_grad(), model.inference_session(max_length=ids.shape[1] + 200) as session:
            killer = KillAt(session, servers, killed_block, ids.shape[1], tokens=100)
            tokens = model.generate(ids, max_new_tokens=200, do_sample=False, stopping_criteria=[killer])
            route_after = session.route
        assert killer.killed_peer is not None
        assert torch.equal(tokens, expected)
        assert killer.killed_peer not in {hop.peer_id for hop in route_after}
        if len(splits) == 3:  # only the affected blocks were re-routed: the first hop is the same server
            first = next(s for s in servers if s.args[2] == "0:3")
            assert first.maddr is not None and first.maddr.endswith(route_after[0].peer_id)
            assert [(h.start, h.end) for h in route_after] == [(0, 3), (3, 6)]
    finally:
        model.manager.shutdown()
        stop_all(servers)


def test_a_block_with_no_server_left_raises_a_named_error_within_the_bound(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path: Path
) -> None:
    servers = swarm(tiny_gqa_dir, dht_peer, "gone", [(0, 3), (3, 6)], tmp_path)
    model = client(tiny_gqa_dir, dht_peer, "gone", ClientConfig(step_timeout=10.0, max_wait_for_blocks=3.0))
    ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(12))
    try:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, do_sample=False)
        servers[1].stop()  # blocks 3-5 have no server now
        t0 = time.monotonic()
        with pytest.raises(MissingBlocks, match=r"block\(s\) 3-5 after waiting 3 s"), torch.no_grad():
            model.generate(ids, max_new_tokens=2, do_sample=False)
        assert time.monotonic() - t0 < 3.0 + 10.0
    finally:
        model.manager.shutdown()
        stop_all(servers)
