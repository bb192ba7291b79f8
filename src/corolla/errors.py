"""Typed errors that users and peers can cause.

Every error here carries a one-line, actionable message. The CLI prints ``str(error)``
and exits with status 2; servers send the message back to the peer that caused it.
"""

from __future__ import annotations


class CorollaError(Exception):
    """Base class: something a user or a peer did, explained in one line."""


class ConfigError(CorollaError):
    """A flag, a flag combination or a config file is invalid."""


class ModelNotFound(CorollaError):
    """The model name/path cannot be resolved to a local transformers directory."""


class UnsupportedModel(CorollaError):
    """The model's architecture has no block adapter."""


class DeviceUnavailable(CorollaError):
    """The requested device or dtype cannot be used on this machine."""


class MissingBlocks(CorollaError):
    """No chain of online servers covers every block."""

    def __init__(self, missing: list[int], waited: float | None = None, cause: str | None = None) -> None:
        self.missing = list(missing)
        ranges = format_ranges(self.missing)
        waited_txt = f" after waiting {waited:.0f} s" if waited is not None else ""
        cause_txt = f" ({cause})" if cause else ""
        super().__init__(
            f"no online server hosts block(s) {ranges}{waited_txt}{cause_txt}; start a server for them "
            "(corolla serve MODEL --initial_peers ...) or check --initial_peers"
        )


class RemoteError(CorollaError):
    """A server answered a request with an error (its message is kept)."""


class AllocationFailed(CorollaError):
    """The server's attention-cache budget cannot hold a new session."""


class BadRequest(CorollaError):
    """A request from a peer is malformed or exceeds the server's limits."""


class SwarmUnavailable(CorollaError):
    """The DHT cannot be reached (bad initial peers, or the local DHT process is gone)."""


class ServerUnavailable(CorollaError):
    """A server did not answer in time or closed the connection."""


class Unauthorized(CorollaError):
    """A server refused the caller: no proof of the swarm key, or not in its --allowed_peers."""


def format_ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
