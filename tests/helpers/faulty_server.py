"""TEST-ONLY fault injector: a ``corolla serve`` whose blocks compute wrong outputs.

    PYTHONPATH=tests python -m helpers.faulty_server [--fault_noise 0.05] [--fault_every 1] \\
        [--fault_after 0] MODEL [corolla serve flags...]

Patches ``SpanBackend._run_sync`` (the compute of every forward pass and inference step of this
process) so that every ``fault_every``-th call after the first ``fault_after`` adds Gaussian noise of
``fault_noise`` x the output's standard deviation to its output, then runs
``corolla.cli.run_server.main`` with the other arguments. The server otherwise behaves normally
(announces, routes, caches), which is what a dishonest or broken volunteer looks like to a client.
Nothing under ``src/`` knows about this module; it exists for tests/integration/test_verified_outputs.py.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Sequence
from typing import Any

import torch

FAULT_FLAGS = {"--fault_noise": float, "--fault_every": int, "--fault_after": int}


def split_args(argv: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """(the ``--fault_*`` values, the rest for ``corolla serve``), in either ``--flag value`` or
    ``--flag=value`` form."""
    faults: dict[str, float] = {"noise": 0.05, "every": 1, "after": 0}
    rest: list[str] = []
    items = iter(argv)
    for arg in items:
        name, _, value = arg.partition("=")
        if name in FAULT_FLAGS:
            faults[name.removeprefix("--fault_")] = FAULT_FLAGS[name](value or next(items))
        else:
            rest.append(arg)
    return faults, rest


def install_fault(noise: float, every: int = 1, after: int = 0, seed: int = 0) -> None:
    """Make ``SpanBackend._run_sync`` perturb its outputs (see the module's docstring)."""
    from corolla.runtime.backend import SpanBackend

    original = SpanBackend._run_sync
    calls = itertools.count(1)
    lock = threading.Lock()
    generator = torch.Generator().manual_seed(seed)

    def faulty_run_sync(self: SpanBackend, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(self, *args, **kwargs)
        with lock:
            n = next(calls)
            if n <= after or (n - after) % every != 0:
                return out
            noise_ = torch.randn(out.shape, generator=generator)
        scale = noise * out.float().std()
        return (out.float() + scale * noise_).to(out.dtype)

    SpanBackend._run_sync = faulty_run_sync  # type: ignore[method-assign]
    print(f"FAULTY SERVER (test only): noise {noise} x std on every {every}th step after {after}",
          file=sys.stderr, flush=True)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    faults, rest = split_args(sys.argv[1:] if argv is None else argv)
    install_fault(float(faults["noise"]), int(faults["every"]), int(faults["after"]))
    from corolla.cli.run_server import main as serve

    return serve(rest)


if __name__ == "__main__":
    sys.exit(main())
