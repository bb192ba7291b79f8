"""A local stand-in for the Hugging Face hub's download API.

:class:`HubEndpoint` serves directories as model repos over HTTP on this machine, speaking the part of
the hub's API that ``huggingface_hub`` (2.4) uses to download models: ``GET /api/models/{repo}`` and
``GET /api/models/{repo}/revision/{rev}`` (model info), ``GET /api/models/{repo}/tree/{rev}[/{path}]``
(file listing, one page) and ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` (file metadata and bytes,
with ``Range``). Code under test reaches it only through ``HF_ENDPOINT``, as it would reach the hub:

* another process: put ``HF_ENDPOINT=<endpoint.url>`` in its environment. ``huggingface_hub`` reads the
  variable once, when it is imported.
* this process, after ``huggingface_hub`` is imported: setting the variable changes nothing. Patch
  ``huggingface_hub.constants.ENDPOINT`` *and* ``huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE``
  (``url + "/{repo_id}/resolve/{revision}/{filename}"``, what ``hf_hub_download`` formats), and also
  ``huggingface_hub.hf_api.api.endpoint``: the module-level ``model_info``, ``list_repo_files``, …
  are methods of an ``HfApi`` built at import (a new ``HfApi()`` reads ``constants.ENDPOINT`` when
  built; transformers keeps its own in ``transformers.utils.hub._hf_api``). Or pass ``endpoint=url`` to
  ``HfApi``, ``hf_hub_download`` and ``snapshot_download``.

As on the hub, ``*.safetensors`` files and files over 10 MiB are LFS files: their tree entries carry
``lfs`` with their real sha256, and resolving them answers ``302`` to ``{url}/_cdn/{repo}/{sha256}/{file}``
(with ``?commit=``), which serves the bytes. The hub's CDN is another host, where ``huggingface_hub``'s
metadata ``HEAD`` stops at the ``302`` and reads ``X-Linked-Etag``/``X-Linked-Size``; this CDN is the same
host, so ``huggingface_hub`` follows the redirect, and CDN answers therefore also carry ``X-Repo-Commit``
and the sha256 as ``ETag``. Like the hub's signed CDN URLs, the CDN path needs no token (it is learnt from
an authorised resolve). Every other path of a gated repo needs ``Authorization: Bearer <token>``: none
gives ``401``, a wrong one ``403``, both with ``X-Error-Code: GatedRepo`` (``GatedRepoError``).

Body bytes of ``GET`` resolves and CDN paths are counted per repo and file, as written to the socket
(:meth:`HubEndpoint.bytes_sent`; ``GET /_corolla/counts`` for other processes). By hand:
``python -m corolla.lab.hub_endpoint --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024  # bytes; bigger files are LFS files, as on the hub
CHUNK_SIZE = 64 * 1024  # most bytes written at once
LOG_ENV = "COROLLA_HUB_ENDPOINT_LOG"  # "1": log each request to stderr
COUNTS_PATH = "/_corolla/counts"
CDN_PREFIX = "/_cdn/"
IDLE_TIMEOUT_S = 60.0  # a connection that sends nothing (or reads nothing) this long is closed
SKIPPED_DIRS = frozenset({".git", ".cache"})  # never served: git internals, huggingface_hub's local_dir state

_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_API_SUBPATHS = frozenset({"revision", "tree", "refs", "commits", "commit", "paths-info", "resolve"})
_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
_TRUE = frozenset({"1", "true", "yes"})

JsonObject = dict[str, Any]


def _logging() -> bool:
    return os.environ.get(LOG_ENV) == "1"


# ----------------------------------------------------------------------------------------- repos


@dataclass(frozen=True)
class _File:
    path: str  # in the repo, with "/"
    local: Path
    size: int

    @property
    def is_lfs(self) -> bool:
        return self.path.endswith(".safetensors") or self.size > LFS_THRESHOLD


@dataclass(frozen=True)
class _Revision:
    name: str
    commit: str
    files: dict[str, _File]
    created: str  # the hub's date format


@dataclass
class _Repo:
    repo_id: str
    token: str | None = None
    revisions: dict[str, _Revision] = field(default_factory=dict)  # by branch name, in order added

    def find(self, revision: str) -> _Revision | None:
        if found := self.revisions.get(revision):
            return found
        return next((known for known in self.revisions.values() if known.commit == revision), None)

    @property
    def default_revision(self) -> str:
        return "main" if "main" in self.revisions else next(iter(self.revisions))


def _scan(root: Path) -> dict[str, _File]:
    """The files under ``root`` (recursively, following links), by repo path, sorted."""
    found = {}
    for local in sorted(root.rglob("*")):
        relative = local.relative_to(root)
        if local.is_file() and not SKIPPED_DIRS.intersection(relative.parts[:-1]):
            found[relative.as_posix()] = _File(relative.as_posix(), local, local.stat().st_size)
    return found


def _commit_sha(repo_id: str, revision: str, files: dict[str, _File]) -> str:
    text = f"{repo_id}\n{revision}\n" + "".join(
        f"{path}\t{file.size}\n" for path, file in sorted(files.items())
    )
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class _Digests:
    """sha256 and git blob ids of local files, computed on first use and cached by (path, size, mtime)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[tuple[str, str, int, int], str] = {}

    def sha256(self, path: Path) -> str:
        return self._cached("sha256", path, lambda: _hash_file(hashlib.sha256(), path))

    def git_blob_id(self, path: Path) -> str:
        def compute() -> str:
            header = f"blob {path.stat().st_size}\0".encode()
            return _hash_file(hashlib.sha1(header, usedforsecurity=False), path)

        return self._cached("git", path, compute)

    def _cached(self, kind: str, path: Path, compute: Callable[[], str]) -> str:
        stat = path.stat()
        key = (kind, str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._known.get(key)
        if known is None:  # two threads may both compute it: harmless
            known = compute()
            with self._lock:
                self._known[key] = known
        return known


def _hash_file(digest: Any, path: Path) -> str:
    with path.open("rb") as source:
        while block := source.read(1 << 20):
            digest.update(block)
    return str(digest.hexdigest())


# ----------------------------------------------------------------------------------------- replies


class _HubError(Exception):
    """An error answer: HTTP status, ``X-Error-Code`` (None for plain HTTP errors), message, headers."""

    def __init__(self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


@dataclass
class _Reply:
    """What to answer: a status, headers (``Content-Length`` is added) and a body or a span of a file."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: _File | None = None
    span: tuple[int, int] = (0, 0)  # [start, end) of ``file``
    counted_as: tuple[str, str] | None = None  # (repo id, path) whose bytes_sent the body adds to

    @property
    def length(self) -> int:
        return self.span[1] - self.span[0] if self.file is not None else len(self.body)


def _json_reply(payload: object, status: int = 200) -> _Reply:
    return _Reply(status, {"Content-Type": "application/json"}, json.dumps(payload).encode())


def _error_reply(error: _HubError) -> _Reply:
    message = error.message.encode("ascii", "backslashreplace").decode()  # headers are latin-1
    reply = _json_reply({"error": message}, error.status)
    reply.headers.update(error.headers)
    reply.headers["X-Error-Message"] = message
    if error.code is not None:
        reply.headers["X-Error-Code"] = error.code
    return reply


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) of a single ``bytes=`` range; None when absent or not understood (send it all)."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if not first:  # bytes=-n: the last n bytes
        if int(last) == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(size - int(last), 0), size
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored, as RFC 9110 says
    if start >= size:
        raise _unsatisfiable(size)
    return start, min(int(last) + 1, size) if last else size


def _unsatisfiable(size: int) -> _HubError:
    return _HubError(416, None, "Requested Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})


def _file_reply(file: _File, range_header: str | None, counted_as: tuple[str, str]) -> _Reply:
    span = _parse_range(range_header, file.size)
    headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    if span is None:
        return _Reply(200, headers, file=file, span=(0, file.size), counted_as=counted_as)
    headers["Content-Range"] = f"bytes {span[0]}-{span[1] - 1}/{file.size}"
    return _Reply(206, headers, file=file, span=span, counted_as=counted_as)


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    values = query.get(name)
    return bool(values) and values[-1].lower() in _TRUE


def _bearer(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


# ----------------------------------------------------------------------------------------- endpoint


class HubEndpoint:
    """Serves directories as hub model repos on ``host:port`` (0: any free port), from a daemon thread.

    ``bytes_per_s`` throttles each file body (written in chunks of at most 64 KiB, sleeping between
    them), for tests that stop a download halfway. ``requests`` logs each request as (method, path
    without query, percent-decoded; ``Range`` header or None)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, bytes_per_s: float | None = None) -> None:
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError(f"bytes_per_s must be positive, not {bytes_per_s}")
        self.bytes_per_s = bytes_per_s
        self.requests: list[tuple[str, str, str | None]] = []
        self._host = host
        self._port = port
        self._address: tuple[str, int] | None = None
        self._repos: dict[str, _Repo] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()
        self._digests = _Digests()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- setup

    def add_repo(
        self, repo_id: str, directory: Path | str, *, revision: str = "main", token: str | None = None
    ) -> str:
        """Serve ``directory``'s files as ``repo_id`` at branch ``revision``; return its commit sha.

        A repo is gated once ``token`` is given (the latest token wins); several revisions of one repo
        may be added, each from its own directory. The commit sha is also accepted as a revision."""
        root = Path(directory)
        if not _REPO_ID.fullmatch(repo_id):
            raise ValueError(f"not a repo id (OWNER/NAME): {repo_id!r}")
        if not revision or not root.is_dir():
            raise ValueError(f"need a revision name and a directory, got {revision!r} and {root}")
        files = _scan(root)
        commit = _commit_sha(repo_id, revision, files)
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id))
            repo.token = token if token is not None else repo.token
            repo.revisions[revision] = _Revision(revision, commit, files, _now())
        return commit

    # -- lifecycle

    @property
    def url(self) -> str:
        if self._address is None:
            raise RuntimeError("the endpoint has not been started")
        return f"http://{self._address[0]}:{self._address[1]}"

    def start(self) -> HubEndpoint:
        if self._server is not None:
            raise RuntimeError("the endpoint is already running")
        self._stopping.clear()
        self._server = _Server((self._host, self._port), self)
        self._address = (self._host, self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="hub-endpoint",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Refuse new connections and end the ones open (in-flight bodies stop within a chunk)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def __enter__(self) -> HubEndpoint:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    # -- counts

    def bytes_sent(self, repo_id: str) -> dict[str, int]:
        """Body bytes written per file of ``repo_id`` by ``GET`` resolves (direct, ranged or via CDN)."""
        with self._lock:
            return dict(self._counts.get(repo_id, {}))

    def total_bytes(self, repo_id: str | None = None) -> int:
        with self._lock:
            repos = [self._counts.get(repo_id, {})] if repo_id is not None else list(self._counts.values())
            return sum(sum(files.values()) for files in repos)

    def reset_counts(self) -> None:
        """Forget the byte counts (``requests`` is a plain list: clear it yourself)."""
        with self._lock:
            self._counts.clear()

    def _count(self, repo_id: str, path: str, sent: int) -> None:
        with self._lock:
            files = self._counts.setdefault(repo_id, {})
            files[path] = files.get(path, 0) + sent

    def _all_counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {repo_id: dict(files) for repo_id, files in self._counts.items()}

    # -- answering

    def _answer(self, method: str, target: str, headers: Mapping[str, str]) -> _Reply:
        """The reply to one request; ``headers`` have lower-case names."""
        split = urlsplit(target)
        with self._lock:
            self.requests.append((method, unquote(split.path), headers.get("range")))
        try:
            return self._route(split.path, parse_qs(split.query), headers)
        except _HubError as error:
            return _error_reply(error)

    def _route(self, path: str, query: dict[str, list[str]], headers: Mapping[str, str]) -> _Reply:
        segments = path.split("/")[1:]  # still percent-encoded: "%2F" stays inside its segment
        if path == COUNTS_PATH:
            return _json_reply(self._all_counts())
        if segments[:2] == ["api", "models"] and len(segments) > 2:
            return self._api([unquote(part) for part in segments[2:]], query, headers)
        if path.startswith(CDN_PREFIX):
            return self._cdn([unquote(part) for part in segments[1:]], query, headers)
        if "resolve" in segments[1:3]:
            return self._resolve(segments, headers)
        raise _HubError(404, None, "Not Found")

    def _api(self, parts: list[str], query: dict[str, list[str]], headers: Mapping[str, str]) -> _Reply:
        owner_and_name = len(parts) >= 2 and parts[1] not in _API_SUBPATHS
        repo = self._authorized_repo("/".join(parts[:2]) if owner_and_name else parts[0], headers)
        rest = parts[2:] if owner_and_name else parts[1:]
        if not rest:
            return self._info(repo, repo.default_revision, query)
        if rest[0] == "revision" and len(rest) == 2:
            return self._info(repo, rest[1], query)
        if rest[0] == "tree" and len(rest) >= 2:
            return self._tree(repo, rest[1], "/".join(rest[2:]).strip("/"), query)
        raise _HubError(404, None, "Not Found")

    def _resolve(self, segments: list[str], headers: Mapping[str, str]) -> _Reply:
        cut = 2 if len(segments) > 2 and segments[2] == "resolve" else 1
        repo = self._authorized_repo("/".join(unquote(part) for part in segments[:cut]), headers)
        revision = self._revision(repo, unquote(segments[cut + 1]) if len(segments) > cut + 1 else "")
        file = self._file(revision, unquote("/".join(segments[cut + 2 :])))
        if file.is_lfs:
            return self._redirect_to_cdn(repo, revision, file, headers)
        reply = _file_reply(file, headers.get("range"), (repo.repo_id, file.path))
        reply.headers.update({"X-Repo-Commit": revision.commit, "ETag": f'"{self._blob_id(file)}"'})
        return reply

    def _redirect_to_cdn(
        self, repo: _Repo, revision: _Revision, file: _File, headers: Mapping[str, str]
    ) -> _Reply:
        sha256 = self._digests.sha256(file.local)
        host = headers.get("host") or "{}:{}".format(*(self._address or ("127.0.0.1", 0)))
        location = f"http://{host}{CDN_PREFIX}{quote(repo.repo_id)}/{sha256}/{quote(file.path)}"
        return _Reply(
            302,
            {
                "Location": f"{location}?commit={revision.commit}",
                "X-Repo-Commit": revision.commit,
                "ETag": f'"{self._blob_id(file)}"',
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(file.size),
            },
        )

    def _cdn(self, parts: list[str], query: dict[str, list[str]], headers: Mapping[str, str]) -> _Reply:
        cut = next((i for i in (1, 2) if i < len(parts) and _SHA256.fullmatch(parts[i])), None)
        if cut is None:
            raise _HubError(404, None, "Not Found")
        repo = self._repo("/".join(parts[:cut]))  # no token: like a signed CDN url
        revision, file = self._cdn_file(repo, parts[cut], "/".join(parts[cut + 1 :]), query.get("commit"))
        reply = _file_reply(file, headers.get("range"), (repo.repo_id, file.path))
        name = quote(file.path.rsplit("/", 1)[-1])
        reply.headers.update(
            {
                "X-Repo-Commit": revision.commit,
                "ETag": f'"{parts[cut]}"',
                "Content-Disposition": f"attachment; filename*=UTF-8''{name}; filename=\"{name}\";",
            }
        )
        return reply

    def _cdn_file(
        self, repo: _Repo, sha256: str, path: str, commit: list[str] | None
    ) -> tuple[_Revision, _File]:
        named = repo.find(commit[-1]) if commit else None
        for revision in [named] if named else list(repo.revisions.values()):
            file = revision.files.get(path)
            if file is not None and file.is_lfs and self._digests.sha256(file.local) == sha256:
                return revision, file
        raise _HubError(404, "EntryNotFound", "Entry not found")

    def _info(self, repo: _Repo, name: str, query: dict[str, list[str]]) -> _Reply:
        revision = self._revision(repo, name)
        blobs = _flag(query, "blobs")
        return _json_reply(
            {
                "_id": revision.commit[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
                "sha": revision.commit,
                "lastModified": revision.created,
                "createdAt": revision.created,
                "private": False,
                "gated": "manual" if repo.token is not None else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [self._sibling(file, blobs) for file in revision.files.values()],
                "spaces": [],
                "usedStorage": sum(file.size for file in revision.files.values()),
            }
        )

    def _sibling(self, file: _File, blobs: bool) -> JsonObject:
        if not blobs:
            return {"rfilename": file.path}
        sibling: JsonObject = {"rfilename": file.path, "size": file.size, "blobId": self._blob_id(file)}
        if file.is_lfs:
            sha256 = self._digests.sha256(file.local)
            sibling["lfs"] = {"size": file.size, "sha256": sha256, "pointerSize": len(self._pointer(file))}
        return sibling

    def _tree(self, repo: _Repo, name: str, prefix: str, query: dict[str, list[str]]) -> _Reply:
        revision = self._revision(repo, name)
        files = [file for file in revision.files.values() if not prefix or file.path.startswith(prefix + "/")]
        if prefix and not files:
            raise _HubError(
                404,
                "EntryNotFound",
                f"{prefix} does not exist on {name!r}",
                {"X-Repo-Commit": revision.commit},
            )
        recursive = _flag(query, "recursive")
        entries = [
            self._file_entry(file) for file in files if recursive or "/" not in _below(prefix, file.path)
        ]
        entries += [_folder_entry(revision, folder) for folder in _folders(prefix, files, recursive)]
        return _json_reply(sorted(entries, key=lambda entry: entry["path"]))

    def _file_entry(self, file: _File) -> JsonObject:
        entry: JsonObject = {"type": "file", "oid": self._blob_id(file), "size": file.size, "path": file.path}
        if file.is_lfs:
            sha256 = self._digests.sha256(file.local)
            entry["lfs"] = {"oid": sha256, "size": file.size, "pointerSize": len(self._pointer(file))}
        return entry

    def _pointer(self, file: _File) -> bytes:
        return _LFS_POINTER.format(sha256=self._digests.sha256(file.local), size=file.size).encode()

    def _blob_id(self, file: _File) -> str:
        """The git blob id, as the hub's ``oid``/``ETag``: of the LFS pointer for LFS files."""
        if not file.is_lfs:
            return self._digests.git_blob_id(file.local)
        pointer = self._pointer(file)
        return hashlib.sha1(b"blob %d\0" % len(pointer) + pointer, usedforsecurity=False).hexdigest()

    # -- look-ups (each raises the hub's error)

    def _repo(self, repo_id: str) -> _Repo:
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        return repo

    def _authorized_repo(self, repo_id: str, headers: Mapping[str, str]) -> _Repo:
        repo = self._repo(repo_id)
        if repo.token is None:
            return repo
        given = _bearer(headers.get("authorization"))
        if given is None:
            raise _HubError(
                401,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated"
                " to access it. Please log in.",
            )
        if not hmac.compare_digest(given.encode(), repo.token.encode()):
            raise _HubError(
                403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted and you are not in the authorized list. Visit"
                f" {self.url}/{repo_id} to ask for access.",
            )
        return repo

    def _revision(self, repo: _Repo, name: str) -> _Revision:
        revision = repo.find(name)
        if revision is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {name}")
        return revision

    def _file(self, revision: _Revision, path: str) -> _File:
        file = revision.files.get(path)
        if file is None:
            raise _HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": revision.commit})
        return file


def _below(prefix: str, path: str) -> str:
    return path[len(prefix) + 1 :] if prefix else path


def _folders(prefix: str, files: list[_File], recursive: bool) -> set[str]:
    """The folders to list under ``prefix``: all of them, or only its direct children."""
    found = set()
    for file in files:
        parts = _below(prefix, file.path).split("/")[:-1]
        depth = len(parts) if recursive else min(len(parts), 1)
        found.update("/".join(([prefix] if prefix else []) + parts[: i + 1]) for i in range(depth))
    return found


def _folder_entry(revision: _Revision, path: str) -> JsonObject:
    oid = hashlib.sha1(f"{revision.commit}/{path}".encode(), usedforsecurity=False).hexdigest()
    return {"type": "directory", "oid": oid, "size": 0, "path": path}


# ----------------------------------------------------------------------------------------- HTTP


class _Throttle:
    """Sleeps so that a body goes out at ``bytes_per_s`` at most; wakes up when the endpoint stops."""

    def __init__(self, bytes_per_s: float | None, stopping: threading.Event) -> None:
        self._rate = bytes_per_s
        self._stopping = stopping
        self._started = time.monotonic()
        self._sent = 0

    @property
    def chunk_size(self) -> int:  # about 20 chunks a second when throttled, so that pauses are short
        return CHUNK_SIZE if self._rate is None else int(min(CHUNK_SIZE, max(1024, self._rate / 20)))

    def wait(self, sent: int) -> None:
        if self._rate is None:
            return
        self._sent += sent
        delay = self._started + self._sent / self._rate - time.monotonic()
        if delay > 0:
            self._stopping.wait(delay)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], endpoint: HubEndpoint) -> None:
        self.endpoint = endpoint
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        try:
            super().finish_request(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def drop_connections(self) -> None:
        """Shut the open connections, which ends their handlers' reads and writes."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if _logging() or not isinstance(sys.exc_info()[1], OSError):  # OSError: a client went away
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    server: _Server

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def log_message(self, format: str, *args: Any) -> None:
        if _logging():
            super().log_message(format, *args)

    def _serve(self, *, head: bool) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            reply = self.server.endpoint._answer(self.command, self.path, headers)
        except Exception as error:  # a bug: answer 500 and show it
            traceback.print_exc()
            reply = _error_reply(_HubError(500, None, f"internal error: {error!r}"))
        try:
            self._send_head(reply)
            if not head:
                self._send_body(reply)
        except OSError:  # the client went away, or the endpoint stopped
            self.close_connection = True

    def _send_head(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(reply.length))
        self.end_headers()

    def _send_body(self, reply: _Reply) -> None:
        if reply.file is None:
            self.wfile.write(reply.body)
            return
        endpoint = self.server.endpoint
        throttle = _Throttle(endpoint.bytes_per_s, endpoint._stopping)
        start, end = reply.span
        with reply.file.local.open("rb") as source:
            source.seek(start)
            while start < end:
                chunk = source.read(min(throttle.chunk_size, end - start))
                if endpoint._stopping.is_set() or not chunk:
                    raise ConnectionAbortedError("the endpoint stopped, or the file shrank")
                self.wfile.write(chunk)
                start += len(chunk)
                if reply.counted_as is not None:
                    endpoint._count(*reply.counted_as, len(chunk))
                throttle.wait(len(chunk))


# ----------------------------------------------------------------------------------------- command line


def _repo_spec(text: str) -> tuple[str, str, Path]:
    target, equals, directory = text.partition("=")
    repo_id, _, revision = target.partition("@")
    if not equals or not _REPO_ID.fullmatch(repo_id) or not Path(directory).is_dir():
        raise argparse.ArgumentTypeError(
            f"expected OWNER/NAME[@REVISION]=DIR with an existing DIR, got {text!r}"
        )
    return repo_id, revision or "main", Path(directory)


def _gated_spec(text: str) -> tuple[str, str]:
    repo_id, equals, token = text.partition("=")
    if not equals or not token or not _REPO_ID.fullmatch(repo_id):
        raise argparse.ArgumentTypeError(f"expected OWNER/NAME=TOKEN, got {text!r}")
    return repo_id, token


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m corolla.lab.hub_endpoint",
        description="Serve local directories as Hugging Face hub model repos, for huggingface_hub clients "
        "pointed at it with HF_ENDPOINT (downloads only: model info, file tree, resolve with ranges). "
        f"Byte counts per file: GET {COUNTS_PATH}. Ctrl-C stops it.",
    )
    parser.add_argument(
        "--repo",
        action="append",
        required=True,
        type=_repo_spec,
        metavar="OWNER/NAME[@REVISION]=DIR",
        help="serve DIR's files as this repo at branch REVISION (default main); repeat for more repos",
    )
    parser.add_argument(
        "--gated",
        action="append",
        default=[],
        type=_gated_spec,
        metavar="OWNER/NAME=TOKEN",
        help="gate this repo: requests need 'Authorization: Bearer TOKEN' (huggingface_hub: token=TOKEN)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8000, help="port, 0 for any free one (default %(default)s)"
    )
    parser.add_argument(
        "--bytes_per_s", type=float, default=None, metavar="N", help="throttle each file body to N bytes/s"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    tokens = dict(args.gated)
    if unknown := sorted(set(tokens) - {repo_id for repo_id, _, _ in args.repo}):
        parser.error(f"--gated names repos not given with --repo: {', '.join(unknown)}")
    endpoint = HubEndpoint(host=args.host, port=args.port, bytes_per_s=args.bytes_per_s)
    for repo_id, revision, directory in args.repo:
        endpoint.add_repo(repo_id, directory, revision=revision, token=tokens.get(repo_id))
    try:
        endpoint.start()
        repos = len({repo_id for repo_id, _, _ in args.repo})
        noun = "repo" if repos == 1 else "repos"
        print(f"serving {repos} {noun} at {endpoint.url} (export HF_ENDPOINT={endpoint.url})", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        endpoint.stop()


if __name__ == "__main__":
    sys.exit(main())
