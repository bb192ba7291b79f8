"""The local hub endpoint, driven by the real huggingface_hub client through HF_ENDPOINT."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    HfApi,
    constants,
    get_session,
    hf_api,
    hf_hub_download,
    hf_hub_url,
    list_repo_files,
    snapshot_download,
)
from huggingface_hub.errors import (
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import hf_raise_for_status

from corolla.lab.hub_endpoint import HubEndpoint

REPO = "lab/tiny"
GATED = "lab/gated"
TOKEN = "hf_lab_token"
SHARD = "model-00002-of-00007.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved in 20 KB shards (with an index), plus a text file in a subfolder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_sharded")
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="20KB")
    (path / "notes").mkdir()
    (path / "notes" / "README.md").write_text("a tiny model for the hub endpoint tests\n")
    return path


@pytest.fixture
def hub(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubEndpoint]:
    with HubEndpoint() as endpoint:
        endpoint.add_repo(REPO, model_dir)
        endpoint.add_repo(GATED, model_dir, token=TOKEN)
        point_huggingface_hub_at(monkeypatch, endpoint.url)
        yield endpoint


def point_huggingface_hub_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """What HF_ENDPOINT=url does when set before huggingface_hub is imported."""
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_api.api, "endpoint", url)  # behind huggingface_hub.model_info, list_repo_files, …


def original_files(model_dir: Path) -> dict[str, bytes]:
    return {
        path.relative_to(model_dir).as_posix(): path.read_bytes()
        for path in model_dir.rglob("*")
        if path.is_file()
    }


def test_model_info_and_file_list(hub: HubEndpoint, model_dir: Path, tmp_path: Path) -> None:
    commit = hub.add_repo(REPO, model_dir)  # the same again: the same commit
    info = HfApi().model_info(REPO)
    assert info.sha == commit and info.id == REPO and info.gated is False
    assert sorted(sibling.rfilename for sibling in info.siblings or []) == sorted(original_files(model_dir))
    assert list_repo_files(REPO) == sorted(original_files(model_dir))
    assert HfApi().model_info(REPO, revision=commit).sha == commit

    other = tmp_path / "v2"
    other.mkdir()
    (other / "config.json").write_text("{}")
    commit_v2 = hub.add_repo(REPO, other, revision="v2")
    assert commit_v2 != commit and HfApi().model_info(REPO, revision="v2").sha == commit_v2
    assert list_repo_files(REPO, revision=commit_v2) == ["config.json"]

    for sibling in HfApi().model_info(REPO, files_metadata=True).siblings or []:
        assert sibling.size == (model_dir / sibling.rfilename).stat().st_size
        assert (sibling.lfs is not None) == sibling.rfilename.endswith(".safetensors")


def test_downloads_of_small_and_lfs_files(hub: HubEndpoint, model_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", SHARD):
        path = hf_hub_download(REPO, name, cache_dir=tmp_path)
        assert Path(path).read_bytes() == (model_dir / name).read_bytes()
    sizes = {name: (model_dir / name).stat().st_size for name in ("config.json", SHARD)}
    assert hub.bytes_sent(REPO) == sizes
    assert ("GET", f"/{REPO}/resolve/main/config.json", None) in hub.requests
    assert any(path.startswith("/_cdn/lab/tiny/") and path.endswith(SHARD) for _, path, _ in hub.requests)


def test_snapshot_download_copies_the_repo(hub: HubEndpoint, model_dir: Path, tmp_path: Path) -> None:
    snapshot = Path(snapshot_download(REPO, cache_dir=tmp_path))
    assert original_files(snapshot) == original_files(model_dir)
    assert hub.total_bytes(REPO) == sum(len(data) for data in original_files(model_dir).values())
    assert hub.total_bytes() == hub.total_bytes(REPO)


@pytest.mark.parametrize("name", [SHARD, "config.json"])
def test_ranged_gets_send_exactly_the_bytes_asked(hub: HubEndpoint, model_dir: Path, name: str) -> None:
    data = (model_dir / name).read_bytes()
    url = hf_hub_url(REPO, name)
    cases = {"bytes=100-299": data[100:300], "bytes=400-": data[400:], "bytes=-50": data[-50:]}
    for header, expected in cases.items():
        response = get_session().get(url, headers={"Range": header})  # follows the CDN redirect
        hf_raise_for_status(response)
        assert response.status_code == 206 and response.content == expected
        assert response.headers["Content-Range"].endswith(f"/{len(data)}")
    assert hub.bytes_sent(REPO) == {name: sum(len(expected) for expected in cases.values())}
    assert get_session().get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416


def test_gated_repo_needs_its_token(hub: HubEndpoint, model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(GatedRepoError):
        HfApi().model_info(GATED, token=False)
    with pytest.raises(GatedRepoError):
        hf_hub_download(GATED, SHARD, cache_dir=tmp_path, token=False)
    with pytest.raises(GatedRepoError):
        HfApi().model_info(GATED, token="hf_wrong")
    url = hf_hub_url(GATED, SHARD)
    for headers, status in [({}, 401), ({"Authorization": "Bearer hf_wrong"}, 403)]:
        response = get_session().get(url, headers={"Range": "bytes=0-9", **headers})
        assert response.status_code == status
        with pytest.raises(GatedRepoError):
            hf_raise_for_status(response)
    assert hub.total_bytes(GATED) == 0

    assert HfApi().model_info(GATED, token=TOKEN).gated == "manual"
    path = hf_hub_download(GATED, SHARD, cache_dir=tmp_path, token=TOKEN)
    assert Path(path).read_bytes() == (model_dir / SHARD).read_bytes()


def test_missing_repo_revision_and_file(hub: HubEndpoint, tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFoundError) as missing:
        HfApi().model_info("lab/nothing")
    assert not isinstance(missing.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("lab/nothing", "config.json", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        HfApi().model_info(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="nope", cache_dir=tmp_path)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.json", cache_dir=tmp_path)


def test_stop_refuses_new_requests_and_ends_bodies(model_dir: Path) -> None:
    endpoint = HubEndpoint(bytes_per_s=20_000).start()
    endpoint.add_repo(REPO, model_dir)
    url = f"{endpoint.url}/{REPO}/resolve/main/{SHARD}"
    ended = threading.Event()

    def download() -> None:
        with pytest.raises(httpx2.HTTPError), httpx2.stream("GET", url, follow_redirects=True) as response:
            response.read()  # 16 KB at 20 KB/s: still running when stopped
        ended.set()

    reader = threading.Thread(target=download)
    reader.start()
    time.sleep(0.2)
    endpoint.stop()
    assert ended.wait(2.0)
    reader.join()
    assert 0 < endpoint.total_bytes(REPO) < (model_dir / SHARD).stat().st_size
    with pytest.raises(httpx2.ConnectError):
        get_session().get(f"{endpoint.url}/api/models/{REPO}")


def test_throttle_paces_a_download(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(bytes(200_000))
    with HubEndpoint(bytes_per_s=400_000) as endpoint:
        endpoint.add_repo(REPO, tmp_path)
        started = time.monotonic()
        response = get_session().get(f"{endpoint.url}/{REPO}/resolve/main/big.bin")
        elapsed = time.monotonic() - started
    assert len(response.content) == 200_000
    assert 0.35 < elapsed < 2.0  # 0.45 to 0.5 s expected


def test_counts_for_other_processes(hub: HubEndpoint, tmp_path: Path) -> None:
    hf_hub_download(REPO, "config.json", cache_dir=tmp_path)
    with urllib.request.urlopen(f"{hub.url}/_corolla/counts") as response:
        assert json.load(response) == {REPO: hub.bytes_sent(REPO)}
    hub.reset_counts()
    assert hub.total_bytes() == 0


def test_command_line_serves_until_interrupted(model_dir: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "corolla.lab.hub_endpoint",
        "--repo",
        f"{REPO}={model_dir}",
        "--port",
        "0",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("serving 1 repo at http://127.0.0.1:"), line
        url = line.split()[4]
        with urllib.request.urlopen(f"{url}/api/models/{REPO}") as response:
            assert json.load(response)["id"] == REPO
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=10)
        assert process.returncode == 0 and errors == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
