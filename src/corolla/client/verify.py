"""Verified outputs: a sample of steps is re-run on other servers holding the same blocks, and the
outputs are compared.

The decision logic is here, as plain functions over ``Opinion`` s (one server's output for one
hop of one step); ``session.py`` and ``sequential.py`` fetch the opinions.

- Two outputs **agree** when, for every token, ``|a - b| / max(|a|, |b|)`` (L2 norms over the hidden
  size) is within the tolerance of the looser of the two servers' dtypes (``DEFAULT_TOLERANCES``,
  or ``ClientConfig.verify_tolerance``).
- ``decide`` asks for opinions one at a time until a **strict majority** of those gathered (at least
  two servers) agree: normally the first verifier agrees with the server that computed the step,
  at the cost of one extra request. On a disagreement it asks a third server, a fourth, ... The
  servers outside the majority are the losers: banned for the session and reported.
- When no more servers hold the blocks and there is no majority (two servers that disagree), there
  is no way to tell which one is right: the caller raises ``VerificationError`` naming both.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from corolla.errors import ConfigError, CorollaError
from corolla.swarm.spans import ServerSpan

logger = logging.getLogger(__name__)

# Largest relative error (per token, see ``relative_error``) between two honest computations.
# Measured on SmolLM2-135M (30 blocks, CPU), a token at a time with a KV cache vs a whole sequence
# at once, and vs float32: float32 2.4e-6; float16 3.2e-3 (6.2e-3 vs float32); bfloat16 3.2e-2
# (5.3e-2 vs float32). Each default leaves a margin over that for other hardware and kernels:
# float32 400x, float16 3x, bfloat16 2x (bfloat16 has 8 bits of mantissa: it cannot see a
# perturbation much smaller than 10% of a hidden state's norm).
DEFAULT_TOLERANCES: dict[str, float] = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1}


class VerificationError(CorollaError):
    """Servers holding the same blocks disagree and no majority can say which one is right."""


def tolerance_for(*dtypes: str, override: float | None = None) -> float:
    """The tolerance for comparing outputs of servers computing in ``dtypes``: the loosest one's."""
    if override is not None:
        return override
    return max(DEFAULT_TOLERANCES.get(d, DEFAULT_TOLERANCES["bfloat16"]) for d in dtypes)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest per-token relative difference ``|a - b| / max(|a|, |b|)`` (L2 over the last
    dimension, in float32); 0 for identical tensors, ``inf`` for other shapes or non-finite values."""
    if a.shape != b.shape:
        return math.inf
    if torch.equal(a, b):
        return 0.0
    a32, b32 = a.detach().float(), b.detach().float()
    if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
        return math.inf
    diff = (a32 - b32).norm(dim=-1)
    scale = torch.maximum(a32.norm(dim=-1), b32.norm(dim=-1)).clamp_min(1e-12)
    return float((diff / scale).max()) if diff.numel() else 0.0


@dataclass(frozen=True)
class Opinion:
    """One server's output for one hop (blocks ``start..end-1``) of one step."""

    peer_id: str
    output: torch.Tensor = field(repr=False)
    dtype: str = "float32"  # the server's compute dtype, for the tolerance


@dataclass(frozen=True)
class Verdict:
    """How a set of opinions splits: ``groups`` of indices that agree (largest first), the strict
    ``majority`` group (None without one) and each opinion's error against the majority's first
    opinion (against opinion 0 without a majority)."""

    groups: tuple[tuple[int, ...], ...]
    majority: tuple[int, ...] | None
    errors: tuple[float, ...]

    @property
    def settled(self) -> bool:
        return self.majority is not None

    @property
    def unanimous(self) -> bool:
        return self.settled and len(self.groups) == 1

    @property
    def losers(self) -> tuple[int, ...]:
        """Opinions outside the majority (empty without one)."""
        if self.majority is None:
            return ()
        return tuple(i for i in range(len(self.errors)) if i not in self.majority)


def vote(opinions: Sequence[Opinion], tolerance: float | None = None) -> Verdict:
    """Group the opinions: each joins the first group whose first opinion it agrees with (within
    ``tolerance``, default: by dtype). A group is a majority when it has at least two opinions and
    more than half of all of them."""
    groups: list[list[int]] = []
    for i, op in enumerate(opinions):
        for group in groups:
            first = opinions[group[0]]
            tol = tolerance_for(first.dtype, op.dtype, override=tolerance)
            if relative_error(first.output, op.output) <= tol:
                group.append(i)
                break
        else:
            groups.append([i])
    groups.sort(key=lambda g: (-len(g), g[0]))
    best = groups[0] if groups else []
    majority = tuple(best) if len(best) >= 2 and 2 * len(best) > len(opinions) else None
    ref = opinions[majority[0]] if majority else (opinions[0] if opinions else None)
    errors = tuple(relative_error(ref.output, op.output) for op in opinions) if ref is not None else ()
    return Verdict(tuple(tuple(g) for g in groups), majority, errors)


def decide(
    opinions: Sequence[Opinion],
    ask: Callable[[frozenset[str]], Opinion | None],
    tolerance: float | None = None,
) -> tuple[Verdict, list[Opinion]]:
    """Ask for more opinions (``ask(peers already heard)``, None: no other server) until a strict
    majority agrees or no server is left. Returns the verdict and every opinion gathered."""
    gathered = list(opinions)
    while True:
        verdict = vote(gathered, tolerance)
        if verdict.settled:
            return verdict, gathered
        more = ask(frozenset(o.peer_id for o in gathered))
        if more is None:
            return verdict, gathered
        gathered.append(more)


def verifier_candidates(
    spans: Sequence[ServerSpan],
    start: int,
    end: int,
    *,
    exclude: frozenset[str] | set[str] = frozenset(),
    adapter: str | None = None,
) -> list[ServerSpan]:
    """Servers that can re-run a hop: they hold all of blocks ``start..end-1`` (and ``adapter``, if
    given) and are not in ``exclude``; sorted by peer id (the caller picks one at random, so no
    server can make itself the checker of its own outputs by announcing a high throughput)."""
    return sorted(
        (
            s
            for s in spans
            if s.start <= start
            and end <= s.end
            and s.peer_id not in exclude
            and (adapter is None or adapter in s.info.adapters)
        ),
        key=lambda s: s.peer_id,
    )


def mismatch_account(verdict: Verdict, opinions: Sequence[Opinion], start: int, end: int) -> str:
    """One line: who said what about blocks ``start..end-1``."""
    pairs = zip(opinions, verdict.errors, strict=True)
    parts = [f"...{op.peer_id[-8:]} ({op.dtype}, error {err:.1e})" for op, err in pairs]
    return f"blocks {start}:{end}: " + ", ".join(parts)


# --- the record the caller can read --------------------------------------------------------------


@dataclass(frozen=True)
class Disagreement:
    """One check where servers disagreed. ``errors``: each server's relative error against the
    majority (against the server that computed the step when unresolved); ``losers`` are banned;
    ``majority`` is empty when unresolved (then a ``VerificationError`` was raised)."""

    step: int
    start: int
    end: int
    primary: str  # the server on the route, whose output was being checked
    errors: dict[str, float]
    tolerance: float
    majority: tuple[str, ...]
    losers: tuple[str, ...]

    @property
    def resolved(self) -> bool:
        return bool(self.majority)


@dataclass
class VerificationReport:
    """What verification did in one inference session (``session.verification``) or in a client's
    forward passes (``model.manager.verification``).

    ``steps``: steps (forward passes) run; ``verified_steps``: those sampled for checking;
    ``checks``: hops compared (one per hop of a verified step that another server could re-run);
    ``unverifiable``: hops of verified steps that no other server holds (not checked);
    ``extra_requests``/``extra_tokens``: requests and tokens sent to verifying servers (the tokens
    include the history a verifier is sent to build its cache); ``max_agreeing_error``: the largest
    relative error among outputs that agreed (the honest noise, to compare with the tolerance);
    ``disagreements``; ``banned``: peer id -> why."""

    fraction: float = 0.0
    seed: int | None = None
    steps: int = 0
    verified_steps: int = 0
    checks: int = 0
    unverifiable: int = 0
    extra_requests: int = 0
    extra_tokens: int = 0
    max_agreeing_error: float = 0.0
    disagreements: list[Disagreement] = field(default_factory=list)
    banned: dict[str, str] = field(default_factory=dict)
    _rng: random.Random = field(default_factory=random.Random, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"verify_fraction must be between 0 and 1, got {self.fraction}")
        self._rng.seed(self.seed)

    def sample(self) -> bool:
        """Count a step; True when it is to be verified (a share ``fraction`` of steps, at random)."""
        with self._lock:
            self.steps += 1
            chosen = self.fraction >= 1.0 or (self.fraction > 0.0 and self._rng.random() < self.fraction)
            self.verified_steps += chosen
            return chosen

    def choose(self, spans: Sequence[ServerSpan]) -> ServerSpan:
        with self._lock:
            return self._rng.choice(list(spans))

    def add_extra(self, tokens: int) -> None:
        with self._lock:
            self.extra_requests += 1
            self.extra_tokens += tokens

    def add_unverifiable(self) -> None:
        with self._lock:
            self.unverifiable += 1

    def record(
        self,
        verdict: Verdict,
        opinions: Sequence[Opinion],
        *,
        step: int,
        start: int,
        end: int,
        tolerance: float | None,
    ) -> list[str]:
        """Record one check (``opinions[0]`` is the server on the route); returns the losers' peer
        ids, each banned here with a warning. An unresolved disagreement is recorded and raised as
        ``VerificationError``."""
        tol = tolerance_for(*(o.dtype for o in opinions), override=tolerance)
        with self._lock:
            self.checks += 1
            if verdict.majority is not None:
                agreeing = [verdict.errors[i] for i in verdict.majority]
                self.max_agreeing_error = max(self.max_agreeing_error, *agreeing)
            if verdict.unanimous:
                return []
            errors = {o.peer_id: e for o, e in zip(opinions, verdict.errors, strict=True)}
            majority = tuple(opinions[i].peer_id for i in verdict.majority or ())
            losers = tuple(opinions[i].peer_id for i in verdict.losers)
            self.disagreements.append(
                Disagreement(step, start, end, opinions[0].peer_id, errors, tol, majority, losers)
            )
            account = mismatch_account(verdict, opinions, start, end)
            if not verdict.settled:
                raise VerificationError(
                    f"verification of step {step} failed, {account}: these servers disagree (tolerance "
                    f"{tol:.0e}) and no other server holds these blocks to break the tie, so corolla "
                    "will not guess which output is right; start another server for these blocks, "
                    "or turn verification off (ClientConfig(verify_fraction=0))"
                )
            for peer in losers:
                why = (
                    f"step {step}, blocks {start}:{end}: output differs from the majority "
                    f"({len(majority)} servers) by {errors[peer]:.1e} > {tol:.0e}"
                )
                self.banned[peer] = why
                logger.warning(
                    "verification: server ...%s disagrees with the majority (%s); banned for the session",
                    peer[-8:],
                    why,
                )
            return list(losers)

    def summary(self) -> str:
        """One line for logs and ``--json`` output."""
        banned = ", ".join(f"...{p[-8:]}" for p in self.banned) or "none"
        return (
            f"verified {self.verified_steps}/{self.steps} steps ({self.checks} checks, "
            f"{self.unverifiable} unverifiable, {self.extra_requests} extra requests, "
            f"{self.extra_tokens} extra tokens); {len(self.disagreements)} disagreements; banned: {banned}"
        )
