"""The simulator, at small N: convergence, reproducibility, loss and delay."""

from __future__ import annotations

import pytest

from vmmesh.gossip.sim import SimConfig, Simulation, run_spread


def test_change_reaches_every_node() -> None:
    result = run_spread(SimConfig(nodes=50, seed=1))
    assert result.rounds is not None
    assert result.informed[-1] == 50
    assert result.informed == sorted(result.informed)
    assert result.rounds <= 8
    assert result.bytes_per_node_round > 0
    assert result.messages_per_node_round >= 3  # fanout 3 Syns at least


def test_same_seed_same_run() -> None:
    cfg = SimConfig(nodes=30, seed=7, loss=0.1)
    assert run_spread(cfg) == run_spread(cfg)


def test_loss_and_delay_slow_but_do_not_stop_convergence() -> None:
    base = run_spread(SimConfig(nodes=40, seed=2))
    slow = run_spread(SimConfig(nodes=40, seed=2, loss=0.3, delay=1))
    assert base.rounds is not None and slow.rounds is not None
    assert slow.rounds >= base.rounds


def test_starts_converged_and_stays_so_with_heartbeats() -> None:
    sim = Simulation(SimConfig(nodes=20, seed=3))
    for _ in range(10):
        sim.step()
    now = sim.round * sim.cfg.interval
    for c in sim.cores.values():
        assert all(m.status == "up" for m in c.members(now))
        assert len(c.members(now)) == 20


def test_two_nodes() -> None:
    assert run_spread(SimConfig(nodes=2, seed=0)).rounds == 1


@pytest.mark.parametrize(
    "kwargs", [{"nodes": 1}, {"nodes": 5, "fanout": 0}, {"nodes": 5, "loss": 1.0}]
)
def test_bad_config(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SimConfig(**kwargs)  # type: ignore[arg-type]
