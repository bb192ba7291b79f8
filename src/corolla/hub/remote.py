"""Talking to the hub (or whatever ``HF_ENDPOINT`` names): which commit a revision is, which files
it has, and byte ranges of those files. Errors become typed ones with a line that says what to do."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from corolla.errors import ConfigError, ModelNotFound

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0


class HubUnreachable(Exception):
    """The endpoint did not answer (offline, refused, timed out, cut off mid-transfer)."""


@dataclass(frozen=True)
class RepoInfo:
    commit: str
    files: tuple[str, ...]


def endpoint() -> str:
    """The hub's address as the environment says now (``huggingface_hub`` reads it once, at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def repo_info(repo_id: str, revision: str, token: str | None) -> RepoInfo:
    """The commit ``revision`` points to now and the repo's file names."""
    from huggingface_hub import HfApi

    with _hub_errors(repo_id, revision):
        info = HfApi(endpoint=endpoint()).model_info(repo_id, revision=revision, token=token or None)
    if not info.sha:
        raise ModelNotFound(f"the hub did not say which commit {repo_id}@{revision} is; retry later")
    return RepoInfo(info.sha, tuple(s.rfilename for s in info.siblings or ()))


def get_file(repo_id: str, commit: str, filename: str, token: str | None) -> bytes:
    """A whole (small) file."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = _url(repo_id, commit, filename)
    with _hub_errors(repo_id, commit):
        response = get_session().get(url, headers=build_hf_headers(token=token or None), timeout=_timeout())
        hf_raise_for_status(response)
        return response.content


@contextmanager
def get_range(
    repo_id: str, commit: str, filename: str, start: int, end: int | None, token: str | None
) -> Iterator[tuple[int, Iterator[bytes]]]:
    """Bytes ``start..end-1`` of a file (to its end when ``end`` is None): yields the file's total
    size and an iterator over the body's parts."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = _url(repo_id, commit, filename)
    headers = build_hf_headers(token=token or None)
    headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
    stream = get_session().stream("GET", url, headers=headers, timeout=_timeout())
    with _hub_errors(repo_id, commit), stream as response:
        hf_raise_for_status(response)
        if response.status_code != 206:
            raise ModelNotFound(
                f"{endpoint()} ignored a range request for {repo_id}/{filename} "
                f"(HTTP {response.status_code}); corolla needs an endpoint that serves byte ranges"
            )
        yield _total_size(response, url), response.iter_bytes(1 << 20)


def _url(repo_id: str, commit: str, filename: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, filename, revision=commit, endpoint=endpoint())


def _total_size(response: Any, url: str) -> int:
    content_range = response.headers.get("Content-Range", "")  # "bytes 0-99/1234"
    total = content_range.rpartition("/")[2]
    if not total.isdigit():
        raise ModelNotFound(f"{url} answered a range request without the file's size ({content_range!r})")
    return int(total)


def _timeout() -> Any:
    from huggingface_hub.utils._http import httpx2

    return httpx2.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)


@contextmanager
def _hub_errors(repo_id: str, revision: str) -> Iterator[None]:
    """The hub's errors as lines that say what to do; network trouble as ``HubUnreachable``."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils._http import httpx2

    try:
        yield
    except GatedRepoError:
        raise ConfigError(
            f"{repo_id} is a gated repository: accept its terms on the hub, then pass --token "
            "(or set HF_TOKEN) with an access token of that account"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFound(
            f"the hub has no model {repo_id!r} (or it is private: pass --token or set HF_TOKEN); "
            "check the name"
        ) from None
    except RevisionNotFoundError:
        raise ConfigError(
            f"--revision {revision!r} does not exist in {repo_id}; pass a branch, tag or commit"
        ) from None
    except (OfflineModeIsEnabled, httpx2.TransportError) as error:
        raise HubUnreachable(f"{endpoint()} unreachable ({_first_line(error)})") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else 0
        if status == 401:
            raise ConfigError(
                f"the hub refused the access token for {repo_id} ({_first_line(error)}); "
                "check --token or HF_TOKEN"
            ) from None
        if status >= 500 or status == 429:
            raise HubUnreachable(f"{endpoint()} answered HTTP {status}") from error
        raise ModelNotFound(f"the hub refused {repo_id}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
