"""How many CPU threads a decode pass computes with: chosen by measuring while serving.

A decode pass (one new position of a few sessions through the span) is hundreds of small
operations, and each one that PyTorch splits over its OpenMP threads ends with all of them
waiting for the slowest. With cores to spare that costs little. On a machine where other work
runs (a volunteer's desktop, a client on the same cores), one preempted thread holds the whole
team up at every operation: on 2 cores with two busy processes, the built-in model decoded at
5.5 tok/s with 2 threads and 10.7 with 1 (quiet: 16.2 and 15.6). How many threads are best
depends on the CPU, the model and the load of the moment, so the server measures it:

- **Exploring.** A few passes alternate between the thread count in use and its neighbours in
  ``candidates`` (one more, one fewer): ``ROUNDS`` passes each, interleaved so that a change of
  load or batch size touches them all alike. The fastest median per block wins; a count with
  fewer threads wins ties within ``TIE`` (it leaves cores to the rest of the machine).
- **Exploiting.** Passes then use the winner until the next exploration: ``MIN_GAP`` seconds
  after a move (to keep climbing while it pays); otherwise ``EXPLORE_EVERY`` seconds, doubled
  after each exploration that confirmed the count up to ``EXPLORE_AT_MOST``; or sooner when
  passes slow down by ``SLOWER`` against the winner's figure (load arrived; at most every
  ``MIN_GAP`` seconds).

Only decode passes are tuned; prompts and training passes are long operations that use every
thread. Pure policy: the backend asks ``threads(now)`` before a pass and reports ``record``."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

ROUNDS = 3  # passes per candidate in one exploration
TIE = 1.03  # fewer threads win when within 3 % of the fastest
EXPLORE_EVERY = 10.0  # seconds to the next exploration after a first confirmation ...
EXPLORE_AT_MOST = 80.0  # ... doubled after each further one up to this
SLOWER = 1.5  # passes this much slower than the winner's figure start an exploration ...
MIN_GAP = 1.0  # ... at most this often (seconds), as does a move to another count
SMOOTHING = 0.2  # weight of the newest pass in the running figure


def candidate_counts(max_threads: int) -> tuple[int, ...]:
    """``max_threads`` halved down to 1, most first: 2 -> (2, 1); 16 -> (16, 8, 4, 2, 1)."""
    if max_threads < 1:
        raise ValueError(f"max_threads must be >= 1, got {max_threads}")
    counts = [max_threads]
    while counts[-1] > 1:
        counts.append(counts[-1] // 2)
    return tuple(counts)


@dataclass
class ThreadTuner:
    """The thread count for each decode pass (see the module docstring)."""

    max_threads: int
    candidates: tuple[int, ...] = ()
    best: int = 0
    schedule: list[int] = field(default_factory=list)  # counts still to try in this exploration
    samples: dict[int, list[float]] = field(default_factory=dict)
    medians: dict[int, float] = field(default_factory=dict)  # of ``samples``, at the last decision
    figure: float | None = None  # the winner's median seconds per block at the last decision
    running: float | None = None  # smoothed seconds per block since then
    explore_at: float = 0.0  # when the next exploration is due (0: at the first pass)
    decided_at: float = float("-inf")
    interval: float = EXPLORE_EVERY  # to the next exploration when this one confirms the count
    explorations: int = 0  # finished explorations (for logs and tests)

    def __post_init__(self) -> None:
        self.candidates = candidate_counts(self.max_threads)
        self.best = self.best or self.max_threads

    def threads(self, now: float) -> int:
        """The thread count for the pass about to run."""
        if not self.schedule and len(self.candidates) > 1 and self._due(now):
            self._explore()
        return self.schedule[0] if self.schedule else self.best

    def record(self, threads: int, seconds_per_block: float, now: float) -> None:
        """A pass ran with ``threads`` threads and took ``seconds_per_block`` per block."""
        if self.schedule:
            if threads == self.schedule[0]:
                self.schedule.pop(0)
                self.samples.setdefault(threads, []).append(seconds_per_block)
                if not self.schedule:
                    self._decide(now)
            return
        if threads == self.best:
            old = self.running
            self.running = seconds_per_block if old is None else old + SMOOTHING * (seconds_per_block - old)

    def _due(self, now: float) -> bool:
        if now >= self.explore_at:
            return True
        slowed = self.figure is not None and self.running is not None and self.running > SLOWER * self.figure
        return slowed and now - self.decided_at >= MIN_GAP

    def _explore(self) -> None:
        i = self.candidates.index(self.best)
        neighbours = [self.candidates[j] for j in (i + 1, i - 1) if 0 <= j < len(self.candidates)]
        self.schedule = (neighbours + [self.best]) * ROUNDS
        self.samples = {}

    def _decide(self, now: float) -> None:
        self.medians = {count: statistics.median(times) for count, times in self.samples.items()}
        fastest = min(self.medians.values())
        previous = self.best
        self.best = min(count for count, median in self.medians.items() if median <= TIE * fastest)
        self.figure = self.running = self.medians[self.best]
        self.decided_at = now
        if self.best != previous:
            self.explore_at, self.interval = now + MIN_GAP, EXPLORE_EVERY
        else:
            self.explore_at, self.interval = now + self.interval, min(EXPLORE_AT_MOST, 2 * self.interval)
        self.explorations += 1
