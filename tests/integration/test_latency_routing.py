"""Inference routes through the nearer of two servers holding the same blocks."""

from __future__ import annotations

from pathlib import Path

import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.lab.local_swarm import LocalServer
from corolla.lab.relay import start_delayed_server


def test_inference_prefers_the_near_server(
    tiny_gqa_dir: Path, dht_peer: LocalServer, tmp_path: Path, local_model
) -> None:  # type: ignore[no-untyped-def]
    started = [
        start_delayed_server(str(tiny_gqa_dir), (0, 6), delay, initial_peers=[dht_peer.maddr or ""],
                             extra_args=["--dht_prefix", "nearfar", "--throughput", "100"], log_dir=tmp_path)
        for delay in (0.050, 0.005)
    ]  # fmt: skip
    (far, _), (near, _) = started
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_gqa_dir), initial_peers=[dht_peer.maddr], dht_prefix="nearfar"
    )
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(14))
    try:
        with torch.no_grad(), model.inference_session(max_length=16) as session:
            tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
            (hop,) = session.route
        assert near.maddr is not None and near.maddr.endswith(hop.peer_id)
        rtts = model.manager.rtts(model.manager.spans())
        far_id = (far.maddr or "").rsplit("/", 1)[-1]
        assert rtts[hop.peer_id] < 0.05 <= 0.09 < rtts[far_id]
        with torch.no_grad():
            assert torch.equal(tokens, local_model.generate(ids, max_new_tokens=8, do_sample=False))
    finally:
        model.manager.shutdown()
        for server, relay in started:
            server.stop()
            relay.stop()
