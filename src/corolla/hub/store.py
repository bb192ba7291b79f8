"""The local cache of hub models held in part: a directory per repo commit that the loader reads as
an ordinary transformers directory.

Layout under ``CACHE_DIR/hub``::

    OWNER--NAME/refs/REVISION            the commit a branch or tag pointed to when last seen
    OWNER--NAME/COMMIT.lock              one writer at a time
    OWNER--NAME/COMMIT/                  config, tokenizer files, the safetensors index (whole) and
                                         the weight files (sparse: full length, only fetched bytes)
    OWNER--NAME/COMMIT/.corolla-hub.json what this is (repo, commit, weight files)
    OWNER--NAME/COMMIT/.corolla-ranges.json  the bytes of each weight file on disk
    OWNER--NAME/COMMIT/.last-used        its mtime orders eviction (least recently used first)

A weight file's unfetched bytes read as zeros, so nothing may read a tensor whose bytes are not
recorded as present: ``missing`` says which, and the loader refuses them (``check_present``)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from corolla.errors import ModelNotFound
from corolla.hub import ranges
from corolla.hub.ranges import Range, TensorEntry

MARKER = ".corolla-hub.json"
RANGES = ".corolla-ranges.json"
LAST_USED = ".last-used"
FORMAT_VERSION = 1


def hub_root(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "hub"


def repo_dir(root: Path, repo_id: str) -> Path:
    return root / repo_id.replace("/", "--")


def is_partial(model_dir: Path) -> bool:
    """Whether ``model_dir`` is a store directory (its weights possibly fetched in part)."""
    return (model_dir / MARKER).is_file()


class ModelStore:
    """One repo commit on disk. Writers hold the commit's lock (``lock_path``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._present: dict[str, list[Range]] = self._read_ranges()
        self._headers: dict[str, dict[str, TensorEntry]] = {}
        self._saved_at = 0.0

    @classmethod
    def at(cls, root: Path, repo_id: str, commit: str) -> ModelStore:
        return cls(repo_dir(root, repo_id) / commit)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    # ------------------------------------------------------------ what it is

    def marker(self) -> dict | None:
        try:
            data = json.loads((self.path / MARKER).read_text())
        except (OSError, ValueError):
            return None
        return data if data.get("version") == FORMAT_VERSION else None

    def write_marker(self, repo_id: str, commit: str, weight_files: list[str]) -> None:
        data = {"version": FORMAT_VERSION, "repo_id": repo_id, "commit": commit, "weight_files": weight_files}
        self.write_file(MARKER, json.dumps(data, indent=1).encode())

    def weight_files(self) -> list[str]:
        marker = self.marker()
        return list(marker["weight_files"]) if marker else []

    # ------------------------------------------------------------ whole (small) files

    def has_file(self, name: str) -> bool:
        return (self.path / name).is_file()

    def write_file(self, name: str, data: bytes) -> None:
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(target)

    # ------------------------------------------------------------ weight files, fetched in part

    def present(self, name: str) -> list[Range]:
        return list(self._present.get(name, []))

    def write_range(self, name: str, size: int, start: int, data: bytes) -> None:
        """Put ``data`` at ``start`` of weight file ``name`` (``size`` bytes long, sparse)."""
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            os.pwrite(fd, data, start)
        finally:
            os.close(fd)
        self._present[name] = ranges.merge([*self._present.get(name, []), (start, start + len(data))])

    def save_ranges(self, *, every: float = 0.0) -> None:
        """Record what is on disk (at most once per ``every`` seconds)."""
        if time.monotonic() - self._saved_at < every:
            return
        self.write_file(RANGES, json.dumps({k: v for k, v in self._present.items()}).encode())
        self._saved_at = time.monotonic()

    def reload(self) -> None:
        """Re-read what other processes recorded (call with the lock held, before fetching)."""
        self._present = self._read_ranges()

    def header(self, name: str) -> dict[str, TensorEntry]:
        """The tensors of weight file ``name``, from its header on disk."""
        if name not in self._headers:
            path = self.path / name
            with path.open("rb") as f:
                length = ranges.header_length(f.read(8))
                if not ranges.covers(self.present(name), [(0, length)]):
                    raise ModelNotFound(f"the header of {path} was not fetched; delete {self.path} and retry")
                f.seek(0)
                self._headers[name] = ranges.parse_header(f.read(length))
        return self._headers[name]

    def missing(self, by_file: dict[str, list[str]]) -> dict[str, list[Range]]:
        """The byte ranges not on disk of the tensors ``by_file`` lists per weight file."""
        out: dict[str, list[Range]] = {}
        for name, tensors in by_file.items():
            header = self.header(name)
            wanted = [(header[t].start, header[t].end) for t in tensors]
            lacking = ranges.subtract(wanted, self.present(name))
            if lacking:
                out[name] = lacking
        return out

    def tensor_bytes(self, by_file: dict[str, list[str]]) -> int:
        return sum(
            ranges.total((self.header(f)[t].start, self.header(f)[t].end) for t in ts)
            for f, ts in by_file.items()
        )

    # ------------------------------------------------------------ disk use and eviction

    def touch(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / LAST_USED).touch()

    def last_used(self) -> float:
        try:
            return (self.path / LAST_USED).stat().st_mtime
        except OSError:
            return 0.0

    def disk_bytes(self) -> int:
        """Bytes this commit holds: whole files plus the fetched parts of weight files."""
        weights = set(self.weight_files())
        whole = sum(
            p.stat().st_size for p in self._files() if p.relative_to(self.path).as_posix() not in weights
        )
        return whole + sum(ranges.total(self._present.get(name, [])) for name in weights)

    def file_bytes(self, name: str) -> int:
        return ranges.total(self._present.get(name, []))

    def drop_file(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)
        self._present.pop(name, None)
        self._headers.pop(name, None)
        self.save_ranges()

    def delete(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _files(self) -> Iterator[Path]:
        return (p for p in self.path.rglob("*") if p.is_file())

    def _read_ranges(self) -> dict[str, list[Range]]:
        try:
            data = json.loads((self.path / RANGES).read_text())
        except (OSError, ValueError):
            return {}
        return {name: [(int(s), int(e)) for s, e in spans] for name, spans in data.items()}


# ---------------------------------------------------------------- refs: revision -> commit, offline


def save_ref(root: Path, repo_id: str, revision: str, commit: str) -> None:
    path = repo_dir(root, repo_id) / "refs" / quote(revision, safe="")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(commit)


def load_ref(root: Path, repo_id: str, revision: str) -> str | None:
    """The commit ``revision`` pointed to when last seen; a commit hash stands for itself."""
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    try:
        return (repo_dir(root, repo_id) / "refs" / quote(revision, safe="")).read_text().strip() or None
    except OSError:
        return None


def all_stores(root: Path) -> list[ModelStore]:
    """Every cached commit under ``root``, least recently used first."""
    stores = [ModelStore(m.parent) for m in root.glob(f"*/*/{MARKER}")]
    return sorted(stores, key=ModelStore.last_used)


# ---------------------------------------------------------------- the disk budget (pure policy)


@dataclass(frozen=True)
class Cached:
    """Something eviction may delete: a whole commit of another model, or one weight file of this
    model's commit that holds none of the tensors being fetched."""

    label: str
    store: Path
    file: str | None  # None: the whole commit
    bytes: int
    last_used: float


def choose_evictions(
    candidates: Iterable[Cached], *, used: int, need: int, limit: int
) -> list[Cached] | None:
    """The least recently used candidates to delete so that ``used + need <= limit``; None when
    deleting all of them would not make room."""
    chosen: list[Cached] = []
    for item in sorted(candidates, key=lambda c: c.last_used):
        if used + need <= limit:
            break
        chosen.append(item)
        used -= item.bytes
    return chosen if used + need <= limit else None
