"""Models from a hub: servers and a client fetch only their tensors' bytes from a local endpoint
that speaks the hub's file API (``HF_ENDPOINT``), resume a killed download, work from the cache
with the endpoint gone, refuse a gated repo without a token, and stay within --max_disk_space.

Every process gets an endpoint of its own (all serving the same repos), so that each endpoint's
byte counts are exactly what one process fetched."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.errors import ConfigError
from corolla.hub import ranges
from corolla.hub.model import open_hub_model
from corolla.lab.hub_endpoint import HubEndpoint
from corolla.lab.local_swarm import LOOPBACK, LocalServer, server_args, start_dht_peer, stop_all
from corolla.models.families import family_for
from corolla.runtime.loader import layer_pattern
from helpers.models import tiny_llama_config

SHARDED, SINGLE, GATED = "acme/tiny-sharded", "acme/tiny-single", "acme/tiny-gated"
TOKEN = "hf_test_token"
PREFIX = "hubtiny"
NUM_BLOCKS = 8
SLACK = 1.1  # the target: bytes fetched <= 1.1 x the span's tensor bytes (+ small files)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One seeded random model (8 blocks of ~1 MB) saved sharded (about two blocks a shard) and as
    one file."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=NUM_BLOCKS,
        num_attention_heads=4,
        vocab_size=256,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("hub-repos")
    model.save_pretrained(root / "sharded", max_shard_size="2MB")
    model.save_pretrained(root / "single")
    assert (root / "sharded" / "model.safetensors.index.json").exists()
    assert not (root / "single" / "model.safetensors.index.json").exists()
    return {
        SHARDED: root / "sharded",
        SINGLE: root / "single",
        GATED: root / "single",
        "local": root / "single",
    }


def endpoint(checkpoints: dict[str, Path], **kwargs: float) -> HubEndpoint:
    hub = HubEndpoint(**kwargs)
    hub.add_repo(SHARDED, checkpoints[SHARDED])
    hub.add_repo(SINGLE, checkpoints[SINGLE])
    hub.add_repo(GATED, checkpoints[GATED], token=TOKEN)
    return hub


def weight_bytes(hub: HubEndpoint, repo: str) -> int:
    return sum(n for name, n in hub.bytes_sent(repo).items() if name.endswith(".safetensors"))


def headers_bytes(model_dir: Path) -> int:
    """The header bytes of every weight file (fetched once by every user of the model)."""
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with path.open("rb") as f:
            total += ranges.header_length(f.read(8))
    return total


def tensor_bytes(model_dir: Path, wanted: Callable[[str], bool]) -> int:
    """The bytes of the tensors whose names ``wanted`` accepts, from the checkpoint's headers."""
    total = 0
    for path in model_dir.glob("*.safetensors"):
        data = path.read_bytes()
        entries = ranges.parse_header(data[: ranges.header_length(data[:8])])
        total += sum(e.end - e.start for name, e in entries.items() if wanted(name))
    return total


def span_bytes(model_dir: Path, start: int, end: int) -> int:
    from transformers import AutoConfig

    pattern = layer_pattern(family_for(AutoConfig.from_pretrained(model_dir)))

    def in_span(name: str) -> bool:
        match = pattern.match(name)
        return bool(match) and start <= int(match.group(1)) < end

    return tensor_bytes(model_dir, in_span)


def serve(
    model: str, span: tuple[int, int], hub_url: str, cache_dir: Path, peers: list[str], log_dir: Path,
    *extra: str,
) -> LocalServer:  # fmt: skip
    args = server_args(model, span, LOOPBACK, peers, ["--dht_prefix", PREFIX, "--throughput", "100", *extra])
    return LocalServer(
        [*args, "--cache_dir", str(cache_dir)],
        env={"HF_ENDPOINT": hub_url},
        log_dir=log_dir,
        name=f"{model.replace('/', '-')}-{span[0]}-{span[1]}-{int(time.monotonic() * 1000) % 100000}",
    )


@pytest.fixture(scope="module")
def swarm(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Blocks 0:2 from the sharded repo, 2:4 from the gated single-file one (with --token) and
    4:8 from the sharded repo through a slow endpoint, killed halfway and restarted on a fast one;
    each server with a cache of its own. The first also evicts an older model to stay within
    --max_disk_space."""
    tmp = tmp_path_factory.mktemp("hub-swarm")
    hubs = {name: endpoint(checkpoints).start() for name in ("first", "second", "client", "resume")}
    hubs["slow"] = endpoint(checkpoints, bytes_per_s=1_500_000).start()
    dht = start_dht_peer(log_dir=tmp)
    peers = [dht.maddr or ""]
    servers: list[LocalServer] = []
    try:
        _cache_an_older_model(hubs["client"], tmp / "cache-first")  # ~1 MiB
        limit = span_bytes(checkpoints[SHARDED], 0, 2) + 256 * 1024  # room for one model, not both
        servers.append(
            serve(
                SHARDED,
                (0, 2),
                hubs["first"].url,
                tmp / "cache-first",
                peers,
                tmp,
                "--max_disk_space",
                str(limit),
            )
        )
        servers.append(
            serve(GATED, (2, 4), hubs["second"].url, tmp / "cache-second", peers, tmp, "--token", TOKEN)
        )
        killed = serve(SHARDED, (4, 8), hubs["slow"].url, tmp / "cache-third", peers, tmp)
        half = span_bytes(checkpoints[SHARDED], 4, 8) // 2
        deadline = time.monotonic() + 120
        while weight_bytes(hubs["slow"], SHARDED) < half and killed.process.poll() is None:
            assert time.monotonic() < deadline, killed.log_tail()
            time.sleep(0.05)
        killed.kill()
        killed.stop()
        hubs["slow"].stop()
        servers.append(serve(SHARDED, (4, 8), hubs["resume"].url, tmp / "cache-third", peers, tmp))
        for server in servers:
            server.wait_ready()
        yield {"hubs": hubs, "dht": dht, "servers": servers, "tmp": tmp}
    finally:
        stop_all([*servers, dht])
        for hub in hubs.values():
            hub.stop()


def _cache_an_older_model(hub: HubEndpoint, cache_dir: Path) -> None:
    """Fetch blocks of the single-file repo into ``cache_dir`` (the model a server evicts later)."""
    from corolla.runtime.loader import span_checkpoint_names

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", hub.url)
        old = open_hub_model(SINGLE, revision=None, token=None, cache_dir=cache_dir)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(old.path)
        old.fetch(span_checkpoint_names(old.path, config, 0, 1), what="blocks 0:1")
    hub.reset_counts()


def test_servers_fetch_only_their_spans(swarm: dict, checkpoints: dict[str, Path]) -> None:
    hubs = swarm["hubs"]
    sharded, single = checkpoints[SHARDED], checkpoints[SINGLE]
    fetched_first = weight_bytes(hubs["first"], SHARDED)
    assert fetched_first <= SLACK * span_bytes(sharded, 0, 2) + headers_bytes(sharded)
    fetched_second = weight_bytes(hubs["second"], GATED)
    assert fetched_second <= SLACK * span_bytes(single, 2, 4) + headers_bytes(single)
    whole = sum(p.stat().st_size for p in sharded.glob("*.safetensors"))
    assert fetched_first < 0.35 * whole  # 2 of 8 blocks, not the whole checkpoint
    # small files: config.json, generation_config.json and the index, nothing else
    assert {name for name in hubs["first"].bytes_sent(SHARDED) if not name.endswith(".safetensors")} <= {
        "config.json", "generation_config.json", "model.safetensors.index.json",
    }  # fmt: skip


def test_max_disk_space_evicts_the_older_model(swarm: dict) -> None:
    log = swarm["servers"][0].log_path.read_text()
    assert f"evicted {SINGLE}@" in log and "to stay within --max_disk_space" in log
    assert not list((swarm["tmp"] / "cache-first" / "hub" / SINGLE.replace("/", "--")).glob("*/config.json"))


def test_a_killed_download_resumes(swarm: dict, checkpoints: dict[str, Path]) -> None:
    hubs = swarm["hubs"]
    span = span_bytes(checkpoints[SHARDED], 4, 8)
    before, after = weight_bytes(hubs["slow"], SHARDED), weight_bytes(hubs["resume"], SHARDED)
    assert before >= span // 2
    assert after <= span - before + 512 * 1024  # at most what was in flight at the kill comes again
    assert set(hubs["resume"].bytes_sent(SHARDED)) <= {
        name for name in hubs["resume"].bytes_sent(SHARDED) if name.endswith(".safetensors")
    }  # config, tokenizer and index were on disk already


def test_client_fetches_only_its_layers_and_generates_like_local(
    swarm: dict, checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    hub = swarm["hubs"]["client"]
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        SHARDED, initial_peers=[swarm["dht"].maddr], dht_prefix=PREFIX, cache_dir=str(tmp_path)
    )
    try:
        local_names = ("model.embed_tokens.", "model.norm.", "lm_head.")
        kept = tensor_bytes(checkpoints[SHARDED], lambda name: name.startswith(local_names))
        assert weight_bytes(hub, SHARDED) <= SLACK * kept + headers_bytes(checkpoints[SHARDED])
        local = AutoModelForCausalLM.from_pretrained(checkpoints["local"], dtype=torch.float32).eval()
        ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            remote_out = model.generate(ids, max_new_tokens=8, do_sample=False)
            local_out = local.generate(ids, max_new_tokens=8, do_sample=False)
        assert remote_out.tolist() == local_out.tolist()
    finally:
        model.manager.shutdown()


def test_restart_with_the_hub_gone_serves_from_the_cache(swarm: dict) -> None:
    server = swarm["servers"][-1]
    server.stop()
    gone = swarm["hubs"]["resume"]
    gone.stop()
    restarted = LocalServer(server.args, env={"HF_ENDPOINT": gone.url}, log_dir=swarm["tmp"], name="offline")
    swarm["servers"].append(restarted)
    restarted.wait_ready(60)
    assert "the hub is unreachable" in restarted.log_path.read_text()
    assert "fetching" not in restarted.log_path.read_text()


def test_gated_repo_without_a_token_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with endpoint(checkpoints) as hub:
        result = subprocess.run(
            [sys.executable, "-m", "corolla.cli.run_server", GATED, "--new_swarm", "--cache_dir",
             str(tmp_path)],
            env={**os.environ, "HF_ENDPOINT": hub.url}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "gated" in lines[0] and "--token" in lines[0], result.stderr


def test_max_disk_space_smaller_than_the_span_is_refused(
    checkpoints: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from transformers import AutoConfig

    from corolla.runtime.loader import span_checkpoint_names

    with endpoint(checkpoints) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        model = open_hub_model(SHARDED, revision=None, token=None, cache_dir=tmp_path)
        names = span_checkpoint_names(model.path, AutoConfig.from_pretrained(model.path), 0, 2)
        with pytest.raises(ConfigError, match=r"--max_disk_space 100\.0 KiB is too small for blocks 0:2"):
            model.fetch(names, what="blocks 0:2", max_disk_space=100 * 1024)
        assert weight_bytes(hub, SHARDED) == headers_bytes(checkpoints[SHARDED])  # refused before fetching


def test_a_model_evicted_by_another_process_is_fetched_again(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoConfig

    from corolla.hub.store import ModelStore
    from corolla.runtime.loader import span_checkpoint_names

    with endpoint(checkpoints) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        model = open_hub_model(SINGLE, revision=None, token=None, cache_dir=tmp_path)
        config = AutoConfig.from_pretrained(model.path)
        model.fetch(span_checkpoint_names(model.path, config, 0, 1), what="blocks 0:1")
        ModelStore(model.path).delete()  # what another server's --max_disk_space may do
        assert not model.path.exists()
        up = "model.layers.1.mlp.up_proj.weight"
        model.fetch([up], what="blocks 1:2")  # fetches config, headers and the tensor again
        assert ModelStore(model.path).missing({"model.safetensors": [up]}) == {}
