"""Concurrent sessions on one server: their decode steps are merged into one pass over the
weights, and every session still gets exactly the tokens it gets alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from corolla import AutoDistributedModelForCausalLM
from corolla.client.threads import SPIN_VARIABLES
from corolla.client.transport import call_info
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all
from corolla.protocol.messages import ServerInfoReply

NUM_BLOCKS = 6  # tiny_gqa_dir
SESSIONS = 8
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model(tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator:  # type: ignore[type-arg]
    servers = start_swarm(
        str(tiny_gqa_dir), [(0, NUM_BLOCKS)], initial_peers=[dht_peer.maddr or ""],
        extra_args=["--dht_prefix", "batching"], log_dir=tmp_path_factory.mktemp("batching"),
    )  # fmt: skip
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_gqa_dir), initial_peers=[dht_peer.maddr or ""], dht_prefix="batching"
    )
    yield remote
    remote.manager.shutdown()
    stop_all(servers)


def server_info(model) -> ServerInfoReply:  # type: ignore[no-untyped-def]
    manager = model.manager
    hop = manager.route(0, NUM_BLOCKS)[0]
    return manager.loop.run(call_info(manager.p2p, manager.peer(hop)), timeout=30)


def test_eight_concurrent_sessions_get_the_tokens_each_gets_alone(model, local_model) -> None:  # type: ignore[no-untyped-def]
    prompts = [  # different lengths, so the sessions' caches differ in length at every step
        torch.randint(0, 256, (1, 3 + i), generator=torch.Generator().manual_seed(i)) for i in range(SESSIONS)
    ]
    with torch.no_grad():
        alone = [model.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False) for p in prompts]
    for p, out in zip(prompts, alone, strict=True):  # and alone equals local transformers
        assert torch.equal(out, local_model.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False))
    before = server_info(model).batched_steps

    together: list[torch.Tensor | None] = [None] * SESSIONS
    barrier = threading.Barrier(SESSIONS)

    def run(i: int) -> None:
        barrier.wait()
        with torch.no_grad():
            together[i] = model.generate(prompts[i], max_new_tokens=NEW_TOKENS, do_sample=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(SESSIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for i in range(SESSIONS):
        assert together[i] is not None and torch.equal(together[i], alone[i]), i
    info = server_info(model)
    assert info.batched_steps > before  # the steps really were merged on the server
    # with default flags a CPU server picks its decode threads by measuring (1..its torch threads)
    assert info.decode_threads is not None and 1 <= info.decode_threads <= max(2, torch.get_num_threads())


class _ThreadsSeen(BaseStreamer):
    """Records this process's torch thread count each time generate hands out tokens."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.counts.append(torch.get_num_threads())

    def end(self) -> None:
        pass


def test_a_client_beside_its_server_generates_on_one_thread_and_gives_the_count_back(
    model, local_model, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    for name in SPIN_VARIABLES:  # as a plain Python process starts: libgomp's default spinning
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert model.manager.server_here  # the server announces loopback addresses: it is on this machine
        prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(7))
        seen = _ThreadsSeen()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=8, do_sample=False, streamer=seen)
        assert seen.counts and set(seen.counts) == {1}  # no idle worker to spin beside the server
        assert torch.get_num_threads() == 2  # the user's count, given back
        assert torch.equal(out, local_model.generate(prompt, max_new_tokens=8, do_sample=False))
    finally:
        torch.set_num_threads(before)


def test_generate_computes_logits_for_the_last_position_only(model, local_model) -> None:  # type: ignore[no-untyped-def]
    positions: list[int] = []  # per LM head call: the prompt's last position, then each new token
    hook = model.lm_head.register_forward_hook(lambda _m, args, _out: positions.append(args[0].shape[1]))
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(8))
    try:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    finally:
        hook.remove()
    assert positions == [1] * 4
    assert torch.equal(out, local_model.generate(prompt, max_new_tokens=4, do_sample=False))
