"""The partial-model store: sparse weight files, what is recorded as on disk, refs, eviction policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from corolla.hub import ranges
from corolla.hub.store import (
    Cached,
    ModelStore,
    all_stores,
    choose_evictions,
    hub_root,
    load_ref,
    save_ref,
)

COMMIT = "a" * 40


def test_a_sparse_weight_file_reads_the_fetched_tensors(tmp_path: Path) -> None:
    source = tmp_path / "model.safetensors"
    tensors = {"x": np.arange(1000, dtype=np.float32), "y": np.full(5000, 7, dtype=np.float32)}
    save_file(tensors, source)
    data = source.read_bytes()
    store = ModelStore.at(hub_root(tmp_path / "cache"), "owner/m", COMMIT)
    length = ranges.header_length(data[:8])
    store.write_range("model.safetensors", len(data), 0, data[:length])
    store.write_marker("owner/m", COMMIT, ["model.safetensors"])
    entry = store.header("model.safetensors")["x"]
    assert store.missing({"model.safetensors": ["x", "y"]})["model.safetensors"][0][0] == length
    store.write_range("model.safetensors", len(data), entry.start, data[entry.start : entry.end])
    store.save_ranges()

    reopened = ModelStore(store.path)  # what another process sees
    assert reopened.missing({"model.safetensors": ["x"]}) == {}
    assert "model.safetensors" in reopened.missing({"model.safetensors": ["y"]})
    with safe_open(store.path / "model.safetensors", framework="np") as f:
        assert f.get_tensor("x").tolist() == tensors["x"].tolist()
    assert (store.path / "model.safetensors").stat().st_size == len(data)  # full length, sparse
    assert (
        reopened.disk_bytes()
        == length
        + 4000
        + (store.path / ".corolla-hub.json").stat().st_size
        + (store.path / ".corolla-ranges.json").stat().st_size
    )


def test_refs_remember_the_commit_of_a_branch(tmp_path: Path) -> None:
    root = hub_root(tmp_path)
    assert load_ref(root, "owner/m", "main") is None
    save_ref(root, "owner/m", "main", COMMIT)
    save_ref(root, "owner/m", "refs/pr/1", "b" * 40)
    assert load_ref(root, "owner/m", "main") == COMMIT
    assert load_ref(root, "owner/m", "refs/pr/1") == "b" * 40
    assert load_ref(root, "owner/other", "c" * 40) == "c" * 40  # a commit stands for itself


def test_all_stores_least_recently_used_first(tmp_path: Path) -> None:
    root = hub_root(tmp_path)
    stores = [ModelStore.at(root, f"owner/m{i}", COMMIT) for i in range(3)]
    for i, store in enumerate(stores):
        store.write_marker(f"owner/m{i}", COMMIT, [])
        store.touch()
    stores[0].touch()
    assert [s.path for s in all_stores(root)] == [stores[1].path, stores[2].path, stores[0].path]


def _cached(label: str, size: int, last_used: float) -> Cached:
    return Cached(label, Path(label), None, size, last_used)


@pytest.mark.parametrize(
    ("used", "need", "limit", "evicted"),
    [
        (100, 10, 200, []),  # fits: nothing evicted
        (100, 60, 140, ["old"]),  # the least recently used goes first
        (100, 80, 120, ["old", "mid"]),
        (100, 95, 100, None),  # even evicting everything leaves too little room
    ],
)
def test_choose_evictions(used: int, need: int, limit: int, evicted: list[str] | None) -> None:
    candidates = [_cached("new", 30, 3.0), _cached("old", 30, 1.0), _cached("mid", 30, 2.0)]
    chosen = choose_evictions(candidates, used=used, need=need, limit=limit)
    assert (None if chosen is None else [c.label for c in chosen]) == evicted
