"""The swarm simulator: deterministic, bounded, and the real policy reaches the bound."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from corolla.swarm.simulator import SimConfig, Simulator, lp_bound, simple_bound, simulate

# 30 servers on 20 blocks; 6 GB per block keeps every span shorter than the model
CHURN = {"churn_steps": 20, "joins_per_step": 1, "leaves_per_step": 1, "check_period": 3}
SMALL = SimConfig(num_servers=30, num_blocks=20, block_gb=6.0, **CHURN)


def test_same_seed_same_history() -> None:
    config = replace(SMALL, balance_quality=1.0, seed=7)
    first, second = simulate(config), simulate(config)
    assert first.history == second.history
    assert first.blocks_loaded == second.blocks_loaded
    assert simulate(replace(config, seed=8)).history != first.history


@pytest.mark.parametrize("seed", range(4))
def test_rebalancing_reaches_the_bound_after_settling(seed: int) -> None:
    result = simulate(replace(SMALL, balance_quality=1.0, seed=seed))
    final = result.final
    assert final.phase == "settle" and final.moves == 0  # settled: a full round of checks moved nobody
    assert final.ratio >= 0.9
    assert result.moves() > 0
    assert final.bottleneck <= final.bound * (1 + 1e-9)


def test_without_rebalancing_nobody_moves_and_the_roster_is_the_same() -> None:
    moving, still = (
        simulate(replace(SMALL, balance_quality=1.0)),
        simulate(replace(SMALL, balance_quality=0.0)),
    )
    assert still.moves() == 0 and still.blocks_loaded == 0
    assert [s.bound for s in still.history[: SMALL.churn_steps + 1]] == [
        s.bound for s in moving.history[: SMALL.churn_steps + 1]
    ]
    assert moving.final.ratio >= still.final.ratio


def test_history_has_the_three_phases() -> None:
    result = simulate(SMALL)
    phases = [s.phase for s in result.history]
    assert phases[0] == "join" and phases[1 : SMALL.churn_steps + 1] == ["churn"] * SMALL.churn_steps
    assert set(phases[SMALL.churn_steps + 1 :]) == {"settle"}
    assert all(s.servers == SMALL.num_servers for s in result.history)  # as many join as leave


def test_pinned_servers_never_move() -> None:
    sim = Simulator(replace(SMALL, balance_quality=1.0, pinned_fraction=0.3, churn_steps=0))
    for _ in range(SMALL.num_servers):
        sim.join()
    assert sim.pinned
    where = {p: (sim.spans[p].start, sim.spans[p].end) for p in sim.pinned}
    for _ in range(5):
        sim.check_all()
    assert {p: (sim.spans[p].start, sim.spans[p].end) for p in sim.pinned} == where


def test_lp_bound_is_tighter_when_spans_cannot_tile_the_model() -> None:
    throughputs, lengths = np.ones(8), np.full(8, 30)
    assert simple_bound(throughputs, lengths, 80) == pytest.approx(3.0)
    # blocks 0, 30 and 60 each need T, and a 30-block span holds only one of them: T <= 8 / 3
    assert lp_bound(throughputs, lengths, 80) == pytest.approx(8 / 3)


def test_lp_bound_equals_the_simple_bound_when_spans_tile_the_model() -> None:
    throughputs, lengths = np.array([1.0, 2.0, 1.0, 2.0]), np.array([10, 10, 10, 10])
    assert lp_bound(throughputs, lengths, 20) == pytest.approx(simple_bound(throughputs, lengths, 20))


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError):
        SimConfig(num_servers=0)
    with pytest.raises(ValueError):
        SimConfig(check_period=0.5)
