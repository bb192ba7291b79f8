"""A hub model held in part: open it (small files and weight headers), then fetch the tensors a
server's span or a client's local layers need, and only those bytes.

``open_hub_model`` asks the hub which commit the revision is, fetches what every user needs
(config, tokenizer files, the safetensors index, each weight file's header) and returns a
``HubModel`` whose directory the loader reads like any transformers directory. ``fetch`` then
brings in the byte ranges of the named tensors with HTTP range requests, resumably, inside the
``--max_disk_space`` budget. With the hub unreachable, what the cache holds is used as it is."""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from corolla.errors import ConfigError, ModelNotFound
from corolla.hub import ranges, remote
from corolla.hub.remote import HubUnreachable
from corolla.hub.store import Cached, ModelStore, all_stores, choose_evictions, hub_root, load_ref, save_ref

logger = logging.getLogger(__name__)

# Whole files every user needs: configs, tokenizer files, chat templates (never *.bin, *.onnx, …).
SMALL_FILES = ("*.json", "*.jinja", "*.txt", "*.model", "tokenizer*")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_GAP = 64 * 1024  # fetch a gap this small rather than start a new request
CHUNK = 16 * 1024 * 1024  # the longest request: resume loses at most this much
RETRIES = 3


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    commit: str
    path: Path  # the store directory: a transformers directory with sparse weight files
    token: str | None = field(default=None, repr=False)

    def fetch(self, names: Collection[str], *, what: str, max_disk_space: int | None = None) -> int:
        """Make sure the checkpoint tensors ``names`` are on disk; returns the bytes fetched.
        ``what`` names them in the log and the progress bar ("blocks 0:4", "embeddings and head")."""
        store = ModelStore(self.path)
        store.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(store.lock_path)):
            if store.marker() is None:  # evicted meanwhile (another process's --max_disk_space)
                try:
                    info = remote.repo_info(self.repo_id, self.commit, self.token)
                except HubUnreachable as error:
                    raise ModelNotFound(f"{self.repo_id} was evicted from the cache and {error}") from None
                _fetch_basics(store, self.repo_id, info, self.token)
            by_file = _by_file(self.path, names)
            store.reload()
            missing = store.missing(by_file)
            if not missing:
                store.touch()
                return 0
            need = sum(ranges.total(r) for r in missing.values())
            if max_disk_space is not None:
                _make_room(store, by_file, need, max_disk_space, f"{what} of {self.repo_id}")
            fetched = self._download(store, missing, what)
            store.touch()
        return fetched

    def _download(self, store: ModelStore, missing: dict[str, list[ranges.Range]], what: str) -> int:
        from tqdm.auto import tqdm

        need = sum(ranges.total(r) for r in missing.values())
        logger.info("fetching %s of %s from %s: %s", what, self.repo_id, remote.endpoint(), _human(need))
        started = time.monotonic()
        with tqdm(
            total=need, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{what} of {self.repo_id}",
            mininterval=1.0,
        ) as bar:  # fmt: skip
            for name, lacking in missing.items():
                for start, end in ranges.requests(lacking, max_gap=MAX_GAP, chunk=CHUNK):
                    self._fetch_range(store, name, start, end, bar.update)
        elapsed = time.monotonic() - started
        logger.info(
            "fetched %s of %s (%s) in %.1f s (%s/s)",
            what, self.repo_id, _human(need), elapsed, _human(need / max(elapsed, 1e-6)),
        )  # fmt: skip
        return bar.n

    def _fetch_range(
        self, store: ModelStore, name: str, start: int, end: int, progress: Callable[[int], object]
    ) -> None:
        """One request, retried from where it stopped when the connection breaks."""
        for attempt in range(RETRIES + 1):
            lacking = ranges.subtract([(start, end)], store.present(name))
            if not lacking:
                return
            start = lacking[0][0]
            try:
                with remote.get_range(self.repo_id, self.commit, name, start, end, self.token) as (
                    size,
                    parts,
                ):
                    offset = start
                    for part in parts:
                        store.write_range(name, size, offset, part)
                        offset += len(part)
                        progress(len(part))
                        store.save_ranges(every=0.5)
            except HubUnreachable as error:
                if attempt == RETRIES:
                    raise ModelNotFound(
                        f"fetching {self.repo_id} failed: {error}; "
                        "what was fetched is kept: run again to resume"
                    ) from None
                time.sleep(2**attempt)
            finally:
                store.save_ranges()


def open_hub_model(
    repo_id: str, *, revision: str | None, token: str | None, cache_dir: str | Path
) -> HubModel:
    """The commit ``revision`` (default: main) of ``repo_id``, with its small files and weight
    headers on disk; from the cache alone when the hub is unreachable."""
    root = hub_root(cache_dir)
    revision = revision or "main"
    try:
        if remote.offline():
            raise HubUnreachable("HF_HUB_OFFLINE is set")
        info = remote.repo_info(repo_id, revision, token)
    except HubUnreachable as error:
        return _cached(root, repo_id, revision, token, str(error))
    store = ModelStore.at(root, repo_id, info.commit)
    with FileLock(str(store.lock_path)):
        if store.marker() is None:
            _fetch_basics(store, repo_id, info, token)
        save_ref(root, repo_id, revision, info.commit)
        store.touch()
    return HubModel(repo_id, info.commit, store.path, token)


def hub_model_at(path: Path, token: str | None) -> HubModel:
    """The hub model whose store directory is ``path`` (a directory of corolla's cache passed by path)."""
    marker = ModelStore(path).marker()
    if marker is None:
        raise ModelNotFound(
            f"{path} is an unfinished download; pass the hub repo id instead to fetch it again"
        )
    return HubModel(marker["repo_id"], marker["commit"], path, token)


def _cached(root: Path, repo_id: str, revision: str, token: str | None, why: str) -> HubModel:
    commit = load_ref(root, repo_id, revision)
    store = ModelStore.at(root, repo_id, commit) if commit else None
    if store is None or store.marker() is None:
        raise ModelNotFound(
            f"model {repo_id!r} (revision {revision}) is not in the cache and the hub is unreachable: {why}; "
            "connect to the internet, set HF_ENDPOINT to a reachable mirror, or pass a local directory"
        )
    logger.info("the hub is unreachable (%s): using %s@%s from the cache", why, repo_id, commit[:10])
    store.touch()
    return HubModel(repo_id, commit, store.path, token)


def _fetch_basics(store: ModelStore, repo_id: str, info: remote.RepoInfo, token: str | None) -> None:
    """Small files whole, then the header of every weight file; the marker last, so that a store
    with a marker is complete apart from tensor bytes."""
    top = [f for f in info.files if "/" not in f]
    small = [
        f for f in top if not f.endswith(".safetensors") and any(fnmatch.fnmatch(f, p) for p in SMALL_FILES)
    ]
    if "config.json" not in small:
        raise ModelNotFound(f"{repo_id} has no config.json: it is not a transformers model")
    for name in small:
        if not store.has_file(name):
            store.write_file(name, _whole(repo_id, info.commit, name, token))
    weights = _weight_file_names(store, top)
    if not weights:
        raise ModelNotFound(
            f"{repo_id} has no safetensors weights (model.safetensors or an index); corolla loads "
            "safetensors only: pick a repo that has them, or convert the model and serve the directory"
        )
    for name in weights:
        _fetch_header(store, repo_id, info.commit, name, token)
    store.save_ranges()
    store.write_marker(repo_id, info.commit, weights)


def _weight_file_names(store: ModelStore, top: list[str]) -> list[str]:
    if store.has_file(INDEX):
        weight_map = json.loads((store.path / INDEX).read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    return [SINGLE] if SINGLE in top else []


def _whole(repo_id: str, commit: str, name: str, token: str | None) -> bytes:
    try:
        return remote.get_file(repo_id, commit, name, token)
    except HubUnreachable as error:
        raise ModelNotFound(f"fetching {repo_id}/{name} failed: {error}; run again to retry") from None


def _fetch_header(store: ModelStore, repo_id: str, commit: str, name: str, token: str | None) -> None:
    """The header's length (the file's first 8 bytes), then the rest of the header."""
    start, end = 0, ranges.HEADER_PROBE
    while True:
        try:
            with remote.get_range(repo_id, commit, name, start, end, token) as (size, parts):
                store.write_range(name, size, start, b"".join(parts))
        except HubUnreachable as error:
            raise ModelNotFound(f"fetching {repo_id}/{name} failed: {error}; run again to retry") from None
        with (store.path / name).open("rb") as f:
            length = ranges.header_length(f.read(8))
        if ranges.covers(store.present(name), [(0, min(length, size))]):
            return
        start, end = end, length


def _by_file(model_dir: Path, names: Collection[str]) -> dict[str, list[str]]:
    index = model_dir / INDEX
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(weight_map[name] if weight_map else SINGLE, []).append(name)
    return out


def _make_room(store: ModelStore, by_file: dict[str, list[str]], need: int, limit: int, what: str) -> None:
    """Evict the least recently used cached weights of other models (and this model's weight files
    that hold none of these tensors) until ``need`` more bytes fit under ``limit``."""
    wanted = store.tensor_bytes(by_file)
    if wanted > limit:
        raise ConfigError(
            f"--max_disk_space {_human(limit)} is too small for {what} ({_human(wanted)} of weights); "
            "raise it, or host fewer blocks (--num_blocks)"
        )
    root = store.path.parent.parent
    others = [s for s in all_stores(root) if s.path != store.path and not _in_use(s)]
    candidates = [Cached(_label(s), s.path, None, s.disk_bytes(), s.last_used()) for s in others]
    candidates += [
        Cached(f"{name} of this model", store.path, name, store.file_bytes(name), store.last_used())
        for name in store.weight_files()
        if name not in by_file and store.file_bytes(name)
    ]
    used = sum(s.disk_bytes() for s in others) + store.disk_bytes()
    chosen = choose_evictions(candidates, used=used, need=need, limit=limit)
    if chosen is None:
        raise ConfigError(
            f"--max_disk_space {_human(limit)} cannot hold {what} ({_human(need)} more) beside the weights "
            f"in use; raise it or host fewer blocks (--num_blocks)"
        )
    for item in chosen:
        if item.file is None:
            _delete_unless_in_use(ModelStore(item.store))
        else:
            store.drop_file(item.file)
        logger.info(
            "evicted %s (%s) from the cache to stay within --max_disk_space", item.label, _human(item.bytes)
        )


def _in_use(store: ModelStore) -> bool:
    """Whether another process is fetching into ``store`` now (it holds the commit's lock)."""
    lock = FileLock(str(store.lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def _delete_unless_in_use(store: ModelStore) -> None:
    """Delete a commit's directory, holding its lock so that no fetch writes into it meanwhile."""
    lock = FileLock(str(store.lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return
    try:
        store.delete()
    finally:
        lock.release()


def _label(store: ModelStore) -> str:
    marker = store.marker() or {}
    return f"{marker.get('repo_id', store.path.parent.name)}@{store.path.name[:10]}"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"
