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


class LoseAt(StoppingCriteria):
    """Stream faults at given new-token counts: ``(tokens, hop, "request")`` loses the next step's
    request to hop ``hop``'s server (never written to the stream), ``(tokens, hop, "reply")`` drops
    that server's next reply on arrival. The server stays up and answers pings throughout."""

    def __init__(self, session, prompt: int, faults: list[tuple[int, int, str]]) -> None:  # type: ignore[no-untyped-def]
        self.session, self.prompt = session, prompt
        self.faults = sorted(faults)
        self.stamps: list[float] = []
        self.route: list[str] = []  # the session's servers before the first fault

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.stamps.append(time.monotonic())
        self.route = self.route or [h.peer_id for h in self.session.route]
        while self.faults and input_ids.shape[1] - self.prompt >= self.faults[0][0]:
            _, hop, what = self.faults.pop(0)
            stream = self.session._hops[hop].stream
            if what == "request":
                outbox, send = stream._outbox, stream._outbox.put_nowait
                outbox.put_nowait = lambda item, outbox=outbox, send=send: setattr(outbox, "put_nowait", send)
            else:
                stream._responses = _dropping_one(stream._responses)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


async def _dropping_one(responses):  # type: ignore[no-untyped-def]
    await anext(responses)
    async for response in responses:
        yield response


def test_a_step_lost_with_its_stream_is_resent_on_a_new_stream_to_the_same_server(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path: Path, expected_200, caplog: pytest.LogCaptureFixture
) -> None:
    """A lost request (hop 0: no push brings it) or reply (hop 1) is noticed within seconds, not at
    the 60 s step timeout: the server says it never got the step, or ran it, so the client reopens
    the hop on the same server (no ban) and replays; the tokens are the undisturbed ones."""
    servers = swarm(tiny_gqa_dir, dht_peer, "lost", [(0, 3), (3, 6)], tmp_path)
    model = client(tiny_gqa_dir, dht_peer, "lost", ClientConfig(step_timeout=60.0))
    ids, expected = expected_200
    try:
        with torch.no_grad(), model.inference_session(max_length=ids.shape[1] + 40) as session:
            faults = LoseAt(session, ids.shape[1], [(10, 0, "request"), (25, 1, "reply")])
            tokens = model.generate(ids, max_new_tokens=40, do_sample=False, stopping_criteria=[faults])
            route = [h.peer_id for h in session.route]
        assert torch.equal(tokens, expected[:, : ids.shape[1] + 40])
        assert not faults.faults
        stalls = sorted(b - a for a, b in zip(faults.stamps, faults.stamps[1:], strict=False))
        assert stalls[-2] < 10.0, stalls[-3:]  # both, well inside the step timeout
        lost = [r.getMessage() for r in caplog.records if "its stream was lost" in r.getMessage()]
        assert len(lost) == 2 and "never got the step" in lost[0] and "its reply did not come" in lost[1]
        assert all("trying it again on a new stream" in line for line in lost)
        assert route == faults.route and len(route) == 2  # the same servers, not banned
    finally:
        model.manager.shutdown()
        stop_all(servers)
