"""Server-to-server push: each server sends its output straight to the next one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.client.transport import call_info
from corolla.config import ClientConfig
from corolla.lab.local_swarm import LocalServer, start_swarm, stop_all


def pushes(model, hop_index: int) -> int:  # type: ignore[no-untyped-def]
    manager = model.manager
    hop = manager.route()[hop_index]
    return manager.loop.run(call_info(manager.p2p, manager.peer(hop)), timeout=30).pushes_received


def test_push_on_and_off_give_identical_tokens(
    tiny_gqa_dir: Path,
    dht_peer: LocalServer,
    tmp_path: Path,
    local_model,  # type: ignore[no-untyped-def]
) -> None:
    servers = start_swarm(
        str(tiny_gqa_dir), [(0, 2), (2, 4), (4, 6)], initial_peers=[dht_peer.maddr or ""],
        extra_args=["--dht_prefix", "push", "--throughput", "1"], log_dir=tmp_path,
    )  # fmt: skip
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(13))
    models = {
        push: AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_gqa_dir),
            initial_peers=[dht_peer.maddr],
            dht_prefix="push",
            client_config=replace(ClientConfig(), use_push=push),
        )  # fmt: skip
        for push in (False, True)
    }
    models["bf16"] = AutoDistributedModelForCausalLM.from_pretrained(
        str(tiny_gqa_dir), initial_peers=[dht_peer.maddr], dht_prefix="push",
        client_config=replace(ClientConfig(), wire_dtype="bfloat16"),
    )  # fmt: skip
    try:
        with torch.no_grad():
            expected = local_model.generate(ids, max_new_tokens=24, do_sample=False)
            without = models[False].generate(ids, max_new_tokens=24, do_sample=False)
            assert [pushes(models[False], i) for i in (1, 2)] == [0, 0]
            with_push = models[True].generate(ids, max_new_tokens=24, do_sample=False)
        assert torch.equal(without, expected) and torch.equal(with_push, expected)
        # every decode step after the first pass reached servers 2 and 3 by push
        counts = [pushes(models[True], i) for i in (1, 2)]
        assert all(n >= 22 for n in counts), counts
        # activations asked for in bfloat16 both ways (pushes too): rounded, so close but not equal
        with torch.no_grad():
            reference = local_model(ids).logits
            rounded = models["bf16"](ids).logits
            steps = models["bf16"].generate(ids, max_new_tokens=8, do_sample=False)
        error = (rounded - reference).abs().max().item()
        assert 0 < error < 0.05 * reference.abs().max().item(), error
        after = [pushes(models["bf16"], i) for i in (1, 2)]
        assert steps.shape == (1, 14) and all(n - c >= 6 for n, c in zip(after, counts, strict=True))
    finally:
        for model in models.values():
            model.manager.shutdown()
        stop_all(servers)
