"""The SWIM simulator: a death is seen everywhere in bounded time, loss makes no
false downs, a restarted host's new life and a revocation win everywhere.

The issue asks for the death and the ten lossy minutes at N = 1000.  The death
is checked here at N = 1000 (a few seconds); the ten minutes at N = 100 (ten
minutes at N = 1000 take minutes of CPU).  ``benchmarks/gossip_sim.py``
measures both at N = 1000 and up.
"""

from __future__ import annotations

import tracemalloc

import pytest

from vmmesh.api.gossip import COUNTER_BITS
from vmmesh.config import SWIM_PROFILES
from vmmesh.errors import NotFound
from vmmesh.gossip.swim import PROFILES
from vmmesh.gossip.swim_sim import GENERATION, SwimSimConfig, SwimSimulation, run

DOWN_BOUND = 5.0  # seconds, the target at N = 1000


def test_a_dead_host_is_down_everywhere_within_the_bound_at_1000() -> None:
    sim = SwimSimulation(SwimSimConfig(nodes=1000, seed=2, loss=0.1))
    result = sim.run(changes=0)
    assert result.down_seconds is not None
    assert result.down_seconds <= DOWN_BOUND
    assert result.false_downs == 0


def test_ten_minutes_of_ten_percent_loss_mark_no_live_host_down() -> None:
    sim = SwimSimulation(SwimSimConfig(nodes=100, seed=1, loss=0.1))
    sim.run_until(600.0)
    assert sim.false_downs == 0
    assert all(c.alive_count == 100 for c in sim.cores)


def test_a_refutation_that_misses_a_host_does_not_make_it_a_false_down() -> None:
    """Seed 10 at N = 200: a host that suspected a live one missed every copy of
    its refutation, and the core before the fix marked it down at 75 s.  Now
    a host whose suspicion runs out first pings the suspect, the suspicion
    attached, and the suspect's ack carries its current incarnation."""
    sim = SwimSimulation(SwimSimConfig(nodes=200, seed=10, loss=0.1))
    sim.run_until(80.0)
    assert sim.false_downs == 0


def test_a_change_whose_eager_copies_are_all_lost_still_reaches_every_host() -> None:
    """Seed 4 at N = 200: the 18th change reached all but one host only by the
    next repair (120 s away) in the core before the fix, whose every send of a
    fact was in a 0.5 s burst.  Now a fact also rides on pings and acks for
    some seconds after its eager gossip."""
    result = SwimSimulation(SwimSimConfig(nodes=200, seed=4, loss=0.1)).run(
        changes=18, kill=False, max_wait=5.0
    )
    assert all(s is not None and s < 2.0 for s in result.spread_seconds)


def test_changes_reach_every_host_and_are_counted_in_bytes() -> None:
    result = run(SwimSimConfig(nodes=200, seed=3, loss=0.1))
    assert all(s is not None and s < 2.0 for s in result.spread_seconds)
    rounds = result.spread_rounds[0]
    assert rounds is not None and rounds * result.round_seconds == pytest.approx(
        result.spread_seconds[0]
    )
    assert 0 < result.bytes_per_node_second < 20_000
    assert result.false_downs == 0


def test_same_seed_same_run() -> None:
    cfg = SwimSimConfig(nodes=40, seed=7, loss=0.1)
    assert run(cfg) == run(cfg)


def test_a_restarted_host_s_new_generation_wins_everywhere() -> None:
    sim = SwimSimulation(SwimSimConfig(nodes=50, seed=4, loss=0.1))
    sim.run_until(3.0)
    sim.kill(7)
    sim.run_until(10.0)  # seen down by many
    new_gen = GENERATION + 60_000
    sim.restart(7, new_gen, seed=0)
    reborn = sim.cores[7]
    reborn.set_local("name", "reborn")
    sim.run_until(20.0)
    nid = sim.ids[7]
    for core in sim.cores:
        version = core.version_of(nid)
        assert version is not None and version >> COUNTER_BITS == new_gen
        assert core.state_of(nid) == reborn.state_of(nid)
        assert core.status(nid) == "up"
        assert core.alive_count == 50


def test_a_revoked_host_stays_out_everywhere() -> None:
    sim = SwimSimulation(SwimSimConfig(nodes=50, seed=5, loss=0.1))
    sim.run_until(3.0)
    sim.revoke(9)
    sim.cores[9].set_local("name", "still talking")
    sim.run_until(15.0)
    nid = sim.ids[9]
    for j, core in enumerate(sim.cores):
        if j != 9:
            with pytest.raises(NotFound):
                core.status(nid)


def _memory(nodes: int) -> int:
    tracemalloc.start()
    try:
        sim = SwimSimulation(SwimSimConfig(nodes=nodes, seed=1, loss=0.1))
        sim.run_until(2.0)
        return tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def test_memory_grows_linearly_with_the_mesh() -> None:
    """Four times the hosts, about four times the memory (N^2 would be 16)."""
    small, large = _memory(250), _memory(1000)
    assert large / small < 5.5


@pytest.mark.parametrize(
    "kwargs", [{"nodes": 1}, {"nodes": 5, "loss": 1.0}, {"nodes": 5, "rtt": -1}]
)
def test_bad_config(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SwimSimConfig(**kwargs)  # type: ignore[arg-type]


def test_the_wan_profile_sees_a_death_with_no_false_down_on_a_slow_lossy_path() -> None:
    """Round trips of 0.2-0.6 s, twice the LAN profile's probe timeout, and 5 % loss:
    the WAN profile still marks a death down everywhere, never a live host, and at a
    fraction of the LAN profile's bytes (which probe and suspect far more there)."""
    figures = {}
    for name in ("lan", "wan"):
        cfg = SwimSimConfig(nodes=30, seed=3, loss=0.05, rtt=0.4, swim=PROFILES[name])
        figures[name] = SwimSimulation(cfg).run(changes=1, warmup=30.0, max_wait=120.0)
    wan = figures["wan"]
    assert wan.down_seconds is not None and wan.down_seconds <= 60.0
    assert wan.false_downs == 0 and wan.spread_seconds[0] is not None
    assert wan.bytes_per_node_second * 5 < figures["lan"].bytes_per_node_second


def test_every_profile_is_a_setting_the_config_accepts() -> None:
    assert tuple(PROFILES) == SWIM_PROFILES
