"""ThreadTuner: which thread count decode passes use, from what passes measured."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from corolla.runtime.thread_tuner import (
    EXPLORE_AT_MOST,
    EXPLORE_EVERY,
    MIN_GAP,
    ROUNDS,
    ThreadTuner,
    candidate_counts,
)


def test_candidates_halve_down_to_one() -> None:
    assert candidate_counts(1) == (1,)
    assert candidate_counts(2) == (2, 1)
    assert candidate_counts(6) == (6, 3, 1)
    assert candidate_counts(16) == (16, 8, 4, 2, 1)
    with pytest.raises(ValueError, match="max_threads"):
        candidate_counts(0)


def serve(tuner: ThreadTuner, cost: Callable[[int], float], passes: int, now: float) -> float:
    """Run ``passes`` passes whose seconds per block ``cost(threads)`` gives; returns the clock after."""
    for _ in range(passes):
        threads = tuner.threads(now)
        tuner.record(threads, cost(threads), now)
        now += 0.01
    return now


def test_a_single_core_never_explores() -> None:
    tuner = ThreadTuner(1)
    serve(tuner, lambda t: 1.0, 50, 0.0)
    assert tuner.best == 1 and tuner.explorations == 0


def test_the_first_passes_explore_and_the_fastest_count_wins() -> None:
    tuner = ThreadTuner(2)
    seen: list[int] = []
    now = 0.0
    for _ in range(2 * ROUNDS):
        threads = tuner.threads(now)
        seen.append(threads)
        tuner.record(threads, {2: 2.0, 1: 1.0}[threads], now)
    assert sorted(seen) == [1] * ROUNDS + [2] * ROUNDS and seen[:2] == [1, 2]  # interleaved
    assert tuner.best == 1 and tuner.figure == 1.0 and tuner.explorations == 1
    # ... and it keeps the winner between explorations
    assert {tuner.threads(now + 0.5) for _ in range(5)} == {1}


def test_fewer_threads_win_a_near_tie_and_more_win_when_clearly_faster() -> None:
    near = ThreadTuner(2)
    serve(near, lambda t: {2: 1.00, 1: 1.02}[t], 2 * ROUNDS, 0.0)
    assert near.best == 1
    clear = ThreadTuner(2)
    serve(clear, lambda t: {2: 1.00, 1: 1.10}[t], 2 * ROUNDS, 0.0)
    assert clear.best == 2


def test_it_climbs_one_neighbour_at_a_time_toward_the_fastest() -> None:
    tuner = ThreadTuner(16)
    cost = {16: 8.0, 8: 4.0, 4: 2.0, 2: 1.0, 1: 1.5}.__getitem__
    now = serve(tuner, cost, 2 * ROUNDS, 0.0)
    assert tuner.best == 8  # only 16's neighbour was tried
    for _ in range(2):  # a move explores again MIN_GAP later
        now = serve(tuner, cost, 3 * ROUNDS, now + MIN_GAP)
    assert tuner.best == 2 and tuner.explorations == 3
    serve(tuner, cost, 3 * ROUNDS, now + MIN_GAP)
    assert tuner.best == 2 and tuner.explorations == 4  # no move: the next one comes much later
    assert tuner.explore_at == pytest.approx(tuner.decided_at + EXPLORE_EVERY)


def test_each_confirmation_doubles_the_wait_for_the_next_exploration_and_a_move_resets_it() -> None:
    tuner = ThreadTuner(2)
    cost = {2: 1.0, 1: 1.5}
    now, waits = 0.0, []
    while len(waits) < 6:
        now = serve(tuner, cost.__getitem__, 2 * ROUNDS, max(now, tuner.explore_at))
        waits.append(round(tuner.explore_at - tuner.decided_at, 6))
    assert waits == [EXPLORE_EVERY, 2 * EXPLORE_EVERY, 4 * EXPLORE_EVERY] + [EXPLORE_AT_MOST] * 3
    cost[2] = 3.0  # now fewer threads are faster: a move, explored again soon, then the same doubling
    serve(tuner, cost.__getitem__, 2 * ROUNDS, tuner.explore_at)
    assert tuner.best == 1 and tuner.explore_at - tuner.decided_at == pytest.approx(MIN_GAP)
    serve(tuner, cost.__getitem__, 2 * ROUNDS, tuner.explore_at)
    assert tuner.explore_at - tuner.decided_at == pytest.approx(EXPLORE_EVERY)


def test_load_arriving_starts_an_exploration_before_the_usual_time() -> None:
    tuner = ThreadTuner(2)
    quiet = {2: 1.0, 1: 1.2}
    now = serve(tuner, quiet.__getitem__, 2 * ROUNDS, 0.0)
    assert tuner.best == 2
    busy = {2: 4.0, 1: 1.8}  # other work took the cores: the team waits on preempted threads
    now = serve(tuner, busy.__getitem__, 5, now + MIN_GAP)
    assert tuner.schedule, "a pass this much slower than the figure starts an exploration"
    now = serve(tuner, busy.__getitem__, 2 * ROUNDS, now)
    assert tuner.best == 1 and now < EXPLORE_EVERY
    # load gone: the periodic exploration finds the faster count again
    serve(tuner, quiet.__getitem__, 4 * ROUNDS, now + EXPLORE_AT_MOST)
    assert tuner.best == 2


def test_passes_of_another_count_do_not_count_as_samples() -> None:
    tuner = ThreadTuner(2)
    first = tuner.threads(0.0)
    tuner.record(3 - first, 100.0, 0.0)  # a pass that did not run as scheduled
    assert tuner.schedule[0] == first and tuner.samples == {}
