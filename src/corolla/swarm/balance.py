"""Pure block-choice policy: which contiguous span a new server should host, and when to move.

Nothing here touches the DHT; the only randomness is an injected ``random.Random``.

Vocabulary: a block's *throughput* is the total announced throughput of the servers holding it;
a block is *uncovered* when that total is 0; the swarm's *bottleneck* is its weakest block.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from corolla.swarm.spans import ServerSpan

Span = tuple[int, int]

TIE_TOLERANCE = 1e-9  # relative: window sums closer than this are a tie (floating-point rounding)
MOVE_EPSILON = 1e-6  # relative: a simulated gain this small is rounding, not a reason to move
STAY_MARGIN = 1e-3  # a server moves only to gain more than this x its own throughput x length (as Petals)
MAX_ROUNDS = 200  # greedy re-choice rounds in a simulation; it converges long before (see _Swarm.settle)


def block_throughputs(spans: list[ServerSpan], num_blocks: int) -> list[float]:
    """Total announced throughput serving each block."""
    totals = [0.0] * num_blocks
    for span in spans:
        for i in range(span.start, min(span.end, num_blocks)):
            totals[i] += span.info.throughput
    return totals


def bottleneck(throughputs: Sequence[float]) -> float:
    """The swarm's weakest block: the least total throughput of any block (0 if one is uncovered)."""
    return float(min(throughputs)) if len(throughputs) else 0.0


def choose_span(throughputs: Sequence[float], length: int) -> Span:
    """The window of ``length`` blocks whose blocks are served least, uncovered blocks first.

    Windows are ranked by (number of uncovered blocks, descending), then by total served
    throughput, then by start index, so the choice is deterministic. Sums that differ only by
    floating-point rounding (``TIE_TOLERANCE``) count as a tie."""
    totals = np.asarray(throughputs, dtype=np.float64)
    length = min(length, len(totals))
    if length < 1:
        raise ValueError(f"a span needs at least one block, got length {length} of {len(totals)}")
    start = _pick(*_window_ranks(totals, totals <= 0, length), float(totals.sum()))
    return start, start + length


def leaving_disconnects(spans: list[ServerSpan], me: str, num_blocks: int) -> bool:
    """True when some block covered now would be covered by nobody without ``me``.

    Coverage counts servers, whatever their throughput; a peer absent from ``spans`` disconnects
    nothing."""
    starts, lengths, _ = _as_arrays(spans, num_blocks)
    mine = np.array([s.peer_id == me for s in spans], dtype=bool)
    return _disconnects(starts, lengths, mine, num_blocks)


def should_move(
    spans: list[ServerSpan],
    me: str,
    num_blocks: int,
    balance_quality: float,
    rng: random.Random,
    *,
    pinned: frozenset[str] = frozenset(),
) -> Span | None:
    """The span ``me`` should move to, or ``None`` to stay (Petals' ``should_choose_other_blocks``).

    - ``balance_quality == 0`` disables moving: always ``None``.
    - Never moves when leaving would leave a covered block without any server
      (``leaving_disconnects``), nor when ``me`` is not in ``spans``.
    - ``balance_quality > 1`` forces a move on every check: to the best span other than the
      current one (``None`` only when there is none, i.e. the span is the whole model).
    - Otherwise: take ``me`` out of the swarm and find its best span (``choose_span``'s ranking,
      except that the current span wins ties and near-ties: another span must have less total
      throughput by more than ``STAY_MARGIN`` x own throughput x length, Petals' ``eps``). If that
      is the current span, stay. If not, simulate: put ``me`` there, then let every other server
      not in ``pinned`` greedily re-choose its best span (same ranking), in random order
      (``rng``), round after round until nobody moves. Move when the simulated bottleneck beats
      the current one by more than the factor allows: ``current / simulated < balance_quality``.
      When blocks are uncovered now, both bottlenecks may be 0: then the move counts as an
      improvement iff the simulation leaves fewer blocks uncovered.

    ``pinned``: peers whose spans are fixed (e.g. chosen with ``--block_indices``); they never
    move in the simulation. ``me`` itself stays at its new span during the simulation.

    Shortcut, same answers: no placement has a bottleneck above the mean block throughput
    (sum of throughput x length / ``num_blocks``), so when the current bottleneck is already at
    least ``balance_quality`` x that mean, no simulation can justify a move."""
    if balance_quality <= 0:
        return None
    swarm = _Swarm.from_spans(spans, num_blocks)
    if me not in swarm.peers or swarm.disconnects(me):
        return None
    index = swarm.index(me)
    if balance_quality > 1:
        return swarm.best_other_span(index)
    before = swarm.health()
    if not _may_improve(before, swarm.mean_throughput(), balance_quality):
        return None
    current = swarm.span(index)
    swarm.remove(index)
    target = swarm.best_start(index)
    if target == current[0]:
        return None
    swarm.add(index, target)
    swarm.settle([i for i, p in enumerate(swarm.peers) if i != index and p not in pinned], rng)
    if not _improves(before, swarm.health(), balance_quality):
        return None
    return swarm.span(index)


Health = tuple[int, float]  # (uncovered blocks, bottleneck throughput)


def _improves(before: Health, after: Health, balance_quality: float) -> bool:
    """Whether going from ``before`` to ``after`` gains more than ``balance_quality`` allows."""
    (holes_before, weakest_before), (holes_after, weakest_after) = before, after
    if holes_after != holes_before:
        return holes_after < holes_before
    if holes_after > 0 or weakest_after <= 0:
        return False
    return weakest_before / weakest_after < balance_quality * (1 - MOVE_EPSILON)


def _may_improve(before: Health, mean: float, balance_quality: float) -> bool:
    """Whether any placement could pass ``_improves``: the bottleneck never exceeds the mean."""
    holes, weakest = before
    return holes > 0 or weakest < balance_quality * (1 - MOVE_EPSILON) * mean * (1 + TIE_TOLERANCE)


def _window_ranks(totals: np.ndarray, holes: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """For each start of a window of ``length`` blocks: its uncovered blocks and its total throughput."""
    return _window_sums(holes.astype(np.int64), length), _window_sums(totals, length)


def _window_sums(values: np.ndarray, length: int) -> np.ndarray:
    """Sum of each run of ``length`` consecutive values."""
    running = np.zeros(len(values) + 1, dtype=values.dtype)
    np.cumsum(values, out=running[1:])
    return running[length:] - running[:-length]


def _pick(
    uncovered: np.ndarray | None,
    sums: np.ndarray,
    scale: float,
    prefer: int | None = None,
    margin: float = 0.0,
) -> int:
    """The best start: most uncovered blocks, then least throughput (sums within ``TIE_TOLERANCE``
    x ``scale``, the swarm's total, tie), then the lowest start. ``prefer`` (the current start)
    wins when it has as many uncovered blocks as the best and a sum at most ``margin`` above it.
    ``uncovered=None``: no window has an uncovered block."""
    if uncovered is None:
        least = sums.min() + TIE_TOLERANCE * scale
        if prefer is not None and sums[prefer] <= least + margin:
            return prefer
        return int(np.argmax(sums <= least))
    best = uncovered == uncovered.max()
    least = sums[best].min() + TIE_TOLERANCE * scale
    if prefer is not None and best[prefer] and sums[prefer] <= least + margin:
        return prefer
    return int(np.argmax(best & (sums <= least)))


def _disconnects(starts: np.ndarray, lengths: np.ndarray, mine: np.ndarray, num_blocks: int) -> bool:
    """Whether some block held now is held only by the servers flagged in ``mine``."""
    now = _per_block(starts, lengths, np.ones(len(starts)), num_blocks)
    without = _per_block(starts, lengths, (~mine).astype(np.float64), num_blocks)
    return bool(np.any((now > 0.5) & (without < 0.5)))


def _per_block(starts: np.ndarray, lengths: np.ndarray, values: np.ndarray, num_blocks: int) -> np.ndarray:
    """Sum of ``values[i]`` over the servers holding each block (a difference array)."""
    size = num_blocks + 1
    delta = np.bincount(starts, values, size) - np.bincount(starts + lengths, values, size)
    return np.cumsum(delta[:num_blocks])


def _as_arrays(spans: list[ServerSpan], num_blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Starts, lengths and throughputs of ``spans``, clipped to the model."""
    table = np.array([(s.start, s.end, s.info.throughput) for s in spans], dtype=np.float64).reshape(-1, 3)
    starts = np.minimum(table[:, 0], num_blocks - 1).astype(np.int64)
    ends = np.minimum(table[:, 1], num_blocks).astype(np.int64)
    return starts, np.maximum(ends - starts, 1), table[:, 2].copy()


class _Swarm:
    """A mutable array view of the swarm for the simulations inside ``should_move``.

    ``totals[b]`` is block b's throughput; ``covers[b]`` counts the servers with a positive
    throughput holding it, so that a block is uncovered exactly when ``covers[b] == 0`` (no
    rounding residue from adding and removing throughputs)."""

    def __init__(
        self, peers: list[str], starts: np.ndarray, lengths: np.ndarray, weights: np.ndarray, n: int
    ):
        self.peers, self.num_blocks = peers, n
        self.starts, self.lengths, self.weights = starts, lengths, weights
        self._start, self._length, self._weight = starts.tolist(), lengths.tolist(), weights.tolist()
        self.totals = _per_block(starts, lengths, weights, n)
        self.covers = _per_block(starts, lengths, (weights > 0).astype(np.float64), n).round().astype(int)
        self.totals[self.covers == 0] = 0.0
        self.total = float(np.dot(weights, lengths))  # sum of totals, whatever the placement

    @classmethod
    def from_spans(cls, spans: list[ServerSpan], num_blocks: int) -> _Swarm:
        return cls([s.peer_id for s in spans], *_as_arrays(spans, num_blocks), num_blocks)

    def index(self, peer_id: str) -> int:
        return self.peers.index(peer_id)

    def disconnects(self, peer_id: str) -> bool:
        mine = np.zeros(len(self.peers), dtype=bool)
        if self.peers.count(peer_id) == 1:
            mine[self.peers.index(peer_id)] = True
        else:
            mine[[k for k, p in enumerate(self.peers) if p == peer_id]] = True
        return _disconnects(self.starts, self.lengths, mine, self.num_blocks)

    def span(self, i: int) -> Span:
        return self._start[i], self._start[i] + self._length[i]

    def health(self) -> Health:
        return int(np.count_nonzero(self.covers == 0)), float(self.totals.min())

    def mean_throughput(self) -> float:
        return self.total / self.num_blocks

    def remove(self, i: int) -> None:
        start, end = self.span(i)
        if self._weight[i] > 0:
            self.totals[start:end] -= self._weight[i]
            self.covers[start:end] -= 1
            window = self.totals[start:end]
            window[self.covers[start:end] == 0] = 0.0

    def add(self, i: int, start: int) -> None:
        self.starts[i] = self._start[i] = start
        if self._weight[i] > 0:
            end = start + self._length[i]
            self.totals[start:end] += self._weight[i]
            self.covers[start:end] += 1

    def best_start(self, i: int, *, exclude_current: bool = False) -> int:
        """Server ``i``'s best start, ``i`` being removed; its current start wins near-ties (``_pick``)."""
        length, current = self._length[i], self._start[i]
        sums = _window_sums(self.totals, length)
        has_holes = not self.covers.all()
        uncovered = (
            _window_sums((self.covers == 0).astype(int), length) if has_holes or exclude_current else None
        )
        if exclude_current:
            uncovered[current] = -1
            return _pick(uncovered, sums, self.total)
        margin = STAY_MARGIN * self._weight[i] * length
        return _pick(uncovered, sums, self.total, prefer=current, margin=margin)

    def best_other_span(self, i: int) -> Span | None:
        if self.lengths[i] >= self.num_blocks:
            return None
        self.remove(i)
        start = self.best_start(i, exclude_current=True)
        return start, start + int(self.lengths[i])

    def rechoose(self, i: int) -> bool:
        """Move server ``i`` to its best start; whether it moved."""
        current = int(self.starts[i])
        self.remove(i)
        start = self.best_start(i)
        self.add(i, start)
        return start != current

    def settle(self, movable: list[int], rng: random.Random) -> None:
        """Best-response rounds: in random order, each server that would rather be elsewhere moves,
        until a round moves nobody.

        Each round first finds, for all movable servers at once, those that would move given the
        state at the round's start, then re-checks and moves them one by one in random order (a
        server that only becomes restless mid-round moves in the next round). It terminates:
        every move either covers more blocks than it uncovers or lowers sum_b totals[b]**2, and
        ``MAX_ROUNDS`` bounds it anyway."""
        movable_idx = np.array(movable, dtype=np.int64)
        for _ in range(MAX_ROUNDS):
            restless = movable_idx[self.restless(movable_idx)].tolist() if len(movable_idx) else []
            rng.shuffle(restless)
            moved = [self.rechoose(i) for i in restless]
            if not any(moved):
                return

    def restless(self, idx: np.ndarray) -> np.ndarray:
        """For each server in ``idx``: whether another start ranks strictly better than its own,
        judged without itself (a vectorised ``best_start(i) != starts[i]``)."""
        n = self.num_blocks
        through = np.concatenate(([0.0], np.cumsum(self.totals)))
        s, length, w = self.starts[idx], self.lengths[idx], self.weights[idx]
        e = s + length
        j = np.arange(n)
        end = j + length[:, None]  # (servers, starts): the end of each candidate window
        valid = end <= n
        np.minimum(end, n, out=end)
        overlap = np.maximum(np.minimum(end, e[:, None]) - np.maximum(j, s[:, None]), 0)
        sums = through[end] - through[:n] - w[:, None] * overlap
        own_sum = through[e] - through[s] - w * length
        tol = TIE_TOLERANCE * float(through[-1]) + STAY_MARGIN * w * length
        if not self._holes_matter(s, e, w):
            return own_sum > np.where(valid, sums, np.inf).min(axis=1) + tol
        uncovered = np.where(valid, self._uncovered(s, e, w, end, overlap), -1)
        rows = np.arange(len(idx))
        best, own = uncovered.max(axis=1), uncovered[rows, s]
        least = np.where(uncovered == best[:, None], sums, np.inf).min(axis=1)
        return (best > own) | ((best == own) & (own_sum > least + tol))

    def _holes_matter(self, s: np.ndarray, e: np.ndarray, w: np.ndarray) -> bool:
        """Whether some block is uncovered, or would be without one of these servers."""
        if np.any(self.covers == 0):
            return True
        alone = np.concatenate(([0], np.cumsum(self.covers == 1)))
        return bool(np.any((alone[e] > alone[s]) & (w > 0)))

    def _uncovered(
        self, s: np.ndarray, e: np.ndarray, w: np.ndarray, end: np.ndarray, overlap: np.ndarray
    ) -> np.ndarray:
        """Uncovered blocks of each candidate window, each server taken out of the swarm."""
        holes = np.concatenate(([0], np.cumsum(self.covers == 0)))
        alone = np.concatenate(([0], np.cumsum(self.covers == 1)))  # held by this server only, if w > 0
        j = np.arange(self.num_blocks)
        lo = np.maximum(j, s[:, None])
        hi = np.maximum(np.minimum(end, e[:, None]), lo)
        mine = np.where((overlap > 0) & (w[:, None] > 0), alone[hi] - alone[lo], 0)
        return holes[end] - holes[: self.num_blocks] + mine
