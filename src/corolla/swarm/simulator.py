"""A swarm on paper: the real block-choice and rebalancing policy over synthetic servers.

No networking, no DHT, no clock: time advances in steps. Servers with heterogeneous GPUs
(throughput, memory and so span length) join and leave; each joining server picks its span with
``choose_span`` over the current swarm, and servers check ``should_move`` now and then. The
simulator reports the swarm's bottleneck (its weakest block's total throughput) against an upper
bound on what any placement of the same servers could reach.

Phases: the ``num_servers`` initial servers join one after another (step 0); then
``churn_steps`` steps, each with ``leaves_per_step`` random servers leaving, ``joins_per_step``
new ones joining, and every server checking with probability ``1 / check_period``; then settle
rounds without churn, in which every server checks once (in random order), until a round moves
nobody (or ``max_settle_rounds``). Everything is drawn from two ``random.Random`` seeded from
``seed``: one for the roster (so runs that differ only in ``balance_quality`` see the very same
servers come and go) and one for the checks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import count

import numpy as np

from corolla.protocol.records import ServerInfo, ServerState
from corolla.swarm.balance import bottleneck, choose_span, should_move
from corolla.swarm.spans import ServerSpan


@dataclass(frozen=True)
class GpuProfile:
    name: str
    memory_gb: float
    throughput: float  # tokens/s one server of this kind announces (arbitrary but consistent units)
    share: float  # how common it is among volunteers


DEFAULT_PROFILES = (
    GpuProfile("RTX 3060 12GB", 12, 1.0, 0.25),
    GpuProfile("RTX 3090 24GB", 24, 2.2, 0.25),
    GpuProfile("RTX 4090 24GB", 24, 3.5, 0.15),
    GpuProfile("A100 40GB", 40, 5.0, 0.15),
    GpuProfile("A100 80GB", 80, 6.0, 0.12),
    GpuProfile("H100 80GB", 80, 9.0, 0.08),
)


@dataclass(frozen=True)
class SimConfig:
    num_servers: int = 100
    num_blocks: int = 80
    churn_steps: int = 40
    joins_per_step: int = 2
    leaves_per_step: int = 2
    check_period: float = 5.0  # mean steps between two rebalancing checks of one server
    balance_quality: float = 0.75
    max_settle_rounds: int = 30
    pinned_fraction: float = 0.0  # servers started with fixed blocks (--block_indices): never move
    block_gb: float = 2.0  # memory one block needs, attention-cache share included
    reserve_gb: float = 2.0  # memory kept for activations
    throughput_spread: float = 0.25  # sigma of a lognormal factor on each server's throughput
    profiles: tuple[GpuProfile, ...] = DEFAULT_PROFILES
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_servers < 1 or self.num_blocks < 1:
            raise ValueError(f"need servers and blocks, got {self.num_servers} and {self.num_blocks}")
        if min(self.churn_steps, self.joins_per_step, self.leaves_per_step, self.max_settle_rounds) < 0:
            raise ValueError("step and churn counts must be >= 0")
        if self.check_period < 1 or not 0 <= self.pinned_fraction <= 1 or self.balance_quality < 0:
            raise ValueError("check_period must be >= 1, pinned_fraction in [0, 1], balance_quality >= 0")


@dataclass(frozen=True)
class StepStats:
    step: int
    phase: str  # "join", "churn" or "settle"
    servers: int
    bottleneck: float
    bound: float  # the LP bound (see lp_bound)
    simple_bound: float  # sum(throughput_i * length_i) / num_blocks
    moves: int  # servers that moved during the step

    @property
    def ratio(self) -> float:
        return self.bottleneck / self.bound if self.bound > 0 else 0.0


@dataclass
class SimResult:
    config: SimConfig
    history: list[StepStats] = field(default_factory=list)
    blocks_loaded: int = 0  # blocks loaded by moving servers (each move loads its whole new span)

    @property
    def final(self) -> StepStats:
        return self.history[-1]

    def moves(self, phase: str | None = None) -> int:
        return sum(s.moves for s in self.history if phase is None or s.phase == phase)

    def mean_ratio(self, phase: str, last: float = 0.5) -> float:
        """Mean ratio over the last ``last`` fraction of a phase's steps."""
        ratios = [s.ratio for s in self.history if s.phase == phase]
        tail = ratios[int(len(ratios) * (1 - last)) :]
        return float(np.mean(tail)) if tail else float("nan")

    @property
    def settle_rounds(self) -> int:
        return sum(1 for s in self.history if s.phase == "settle")


def simple_bound(throughputs: np.ndarray, lengths: np.ndarray, num_blocks: int) -> float:
    """Total served throughput x blocks held / number of blocks: the bottleneck if every block got
    exactly its share."""
    return float(np.dot(throughputs, lengths)) / num_blocks


def lp_bound(throughputs: np.ndarray, lengths: np.ndarray, num_blocks: int) -> float:
    """The best bottleneck over *fractional* placements: each server may split its throughput
    over several contiguous windows of its length. Any real placement is one such split, so this
    is an upper bound; it is at most ``simple_bound`` (summing the block constraints gives it) and
    lower whenever contiguity bites, e.g. when spans of 30 blocks cannot tile 80.

    Linear programme, per distinct length L with total throughput W_L:
    maximise T  s.t.  sum_j x[L, j] = W_L,  sum over windows holding b of x >= T for every block b."""
    from scipy.optimize import linprog  # scipy comes with hivemind; imported late: it is slow to import
    from scipy.sparse import coo_matrix

    groups = sorted(set(lengths.tolist()))
    rows, cols, column = [], [], 0  # block-constraint entries (row = block, col = variable)
    eq_cols: list[list[int]] = []
    for length in groups:
        starts = range(num_blocks - length + 1)
        eq_cols.append([column + j for j in starts])
        for j in starts:
            rows.extend(range(j, j + length))
            cols.extend([column + j] * length)
        column += len(starts)
    t_col = column  # the variable T
    a_ub = coo_matrix(
        (
            [-1.0] * len(rows) + [1.0] * num_blocks,
            (rows + list(range(num_blocks)), cols + [t_col] * num_blocks),
        ),
        shape=(num_blocks, column + 1),
    )
    eq_rows = [g for g, cs in enumerate(eq_cols) for _ in cs]
    a_eq = coo_matrix(([1.0] * len(eq_rows), (eq_rows, sum(eq_cols, []))), shape=(len(groups), column + 1))
    b_eq = [float(throughputs[lengths == length].sum()) for length in groups]
    cost = np.zeros(column + 1)
    cost[t_col] = -1.0
    result = linprog(cost, A_ub=a_ub.tocsr(), b_ub=np.zeros(num_blocks), A_eq=a_eq.tocsr(), b_eq=b_eq)
    if not result.success:  # cannot happen for a feasible programme; fall back to the looser bound
        return simple_bound(throughputs, lengths, num_blocks)
    return min(float(-result.fun), simple_bound(throughputs, lengths, num_blocks))


@dataclass
class _Server:
    info: ServerInfo
    length: int
    pinned: bool


class Simulator:
    """One swarm's state; ``run`` plays the three phases and returns the history."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.rng = random.Random(config.seed)  # the roster: who joins, with what, and who leaves
        self.check_rng = random.Random(f"checks-{config.seed}")  # when servers check, and should_move
        self.servers: dict[str, _Server] = {}
        self.spans: dict[str, ServerSpan] = {}
        self.pinned: frozenset[str] = frozenset()
        self.totals = np.zeros(config.num_blocks)  # per block: total throughput
        self.holders = np.zeros(config.num_blocks, dtype=np.int64)  # per block: number of servers
        self._ids = count()
        self._bound_cache: tuple[int, float, float] | None = None  # (roster version, lp, simple)
        self._roster_version = 0
        self.result = SimResult(config)

    def run(self) -> SimResult:
        cfg = self.config
        for _ in range(cfg.num_servers):
            self.join()
        self.record(0, "join", 0)
        for step in range(1, cfg.churn_steps + 1):
            self.record(step, "churn", self.churn_step())
        for step in range(cfg.churn_steps + 1, cfg.churn_steps + 1 + cfg.max_settle_rounds):
            moves = self.check_all()
            self.record(step, "settle", moves)
            if moves == 0:
                break
        return self.result

    # --- one step -------------------------------------------------------------------------

    def churn_step(self) -> int:
        for _ in range(min(self.config.leaves_per_step, len(self.servers) - 1)):
            self.leave(self.rng.choice(sorted(self.servers)))
        for _ in range(self.config.joins_per_step):
            self.join()
        return self.check_some(1 / self.config.check_period)

    def check_some(self, probability: float) -> int:
        peers = self._movable()
        self.check_rng.shuffle(peers)
        return sum(self.check(p) for p in peers if self.check_rng.random() < probability)

    def check_all(self) -> int:
        return self.check_some(1.0)

    # --- servers arrive, leave, move ------------------------------------------------------

    def join(self) -> str:
        cfg, rng = self.config, self.rng
        peer = f"s{next(self._ids):05d}"
        profile = rng.choices(cfg.profiles, weights=[p.share for p in cfg.profiles])[0]
        memory = profile.memory_gb * rng.uniform(0.7, 1.0)  # what is free on the card
        length = int(np.clip((memory - cfg.reserve_gb) // cfg.block_gb, 1, cfg.num_blocks))
        throughput = profile.throughput * rng.lognormvariate(0.0, cfg.throughput_spread)
        pinned = rng.random() < cfg.pinned_fraction
        if pinned:
            start = rng.randrange(cfg.num_blocks - length + 1)
        else:
            start, _ = choose_span(self.totals, length)
        info = ServerInfo(
            state=ServerState.ONLINE,
            start_block=start,
            end_block=start + length,
            throughput=throughput,
            torch_dtype="bfloat16",
            public_name=profile.name,
            version="sim",
            max_inference_length=8192,
            cache_tokens_left=0,
        )
        self.servers[peer] = _Server(info, length, pinned)
        if pinned:
            self.pinned |= {peer}
        self._place(peer, start)
        self._roster_version += 1
        return peer

    def leave(self, peer: str) -> None:
        self._unplace(peer)
        del self.servers[peer]
        self.pinned -= {peer}
        self._roster_version += 1

    def check(self, peer: str) -> bool:
        """One rebalancing check of ``peer`` with the real policy; whether it moved."""
        cfg = self.config
        spans = list(self.spans.values())
        target = should_move(
            spans, peer, cfg.num_blocks, cfg.balance_quality, self.check_rng, pinned=self.pinned
        )
        if target is None:
            return False
        self._unplace(peer)
        self._place(peer, target[0])
        self.result.blocks_loaded += target[1] - target[0]
        return True

    def _place(self, peer: str, start: int) -> None:
        server = self.servers[peer]
        end = start + server.length
        server.info = server.info.model_copy(update={"start_block": start, "end_block": end})
        self.spans[peer] = ServerSpan(peer, start, end, server.info)
        self.totals[start:end] += server.info.throughput
        self.holders[start:end] += 1

    def _unplace(self, peer: str) -> None:
        span = self.spans.pop(peer)
        self.totals[span.start : span.end] -= span.info.throughput
        self.holders[span.start : span.end] -= 1
        self.totals[self.holders == 0] = 0.0  # no rounding residue on uncovered blocks

    def _recount(self) -> None:
        """Per-block totals from scratch, dropping the rounding drift of many small updates."""
        self.totals[:] = 0.0
        self.holders[:] = 0
        for span in self.spans.values():
            self.totals[span.start : span.end] += span.info.throughput
            self.holders[span.start : span.end] += 1
        self.totals[self.holders == 0] = 0.0

    def _movable(self) -> list[str]:
        return sorted(p for p, s in self.servers.items() if not s.pinned)

    # --- figures --------------------------------------------------------------------------

    def record(self, step: int, phase: str, moves: int) -> None:
        self._recount()
        lp, simple = self.bounds()
        stats = StepStats(step, phase, len(self.servers), bottleneck(self.totals), lp, simple, moves)
        self.result.history.append(stats)

    def bounds(self) -> tuple[float, float]:
        if self._bound_cache is None or self._bound_cache[0] != self._roster_version:
            servers = list(self.servers.values())
            throughputs = np.array([s.info.throughput for s in servers])
            lengths = np.array([s.length for s in servers])
            n = self.config.num_blocks
            self._bound_cache = (
                self._roster_version,
                lp_bound(throughputs, lengths, n),
                simple_bound(throughputs, lengths, n),
            )
        return self._bound_cache[1], self._bound_cache[2]


def simulate(config: SimConfig) -> SimResult:
    return Simulator(config).run()
