"""Phi accrual detector: thresholds, adaptation, and the lab timing target."""

from __future__ import annotations

import pytest

from vmmesh.gossip.detector import DOWN, SUSPECT, UP, DetectorConfig, PhiAccrual


def beating(cfg: DetectorConfig, until: float, period: float = 0.5) -> PhiAccrual:
    det = PhiAccrual(cfg, 0.0)
    t = 0.0
    while t + period <= until:
        t += period
        det.heartbeat(t)
    return det


def test_fresh_peer_is_up_and_phi_grows_with_silence() -> None:
    det = PhiAccrual(DetectorConfig(), 10.0)
    assert det.status(10.0) == UP
    assert det.phi(11.0) < det.phi(13.0) < det.phi(16.0)


def test_dead_host_marked_down_within_lab_target() -> None:
    # gossip interval 0.5 s, host dies at t = 30 s just after its last heartbeat
    det = beating(DetectorConfig(), 30.0)
    assert det.status(30.4) == UP
    assert 30.0 + 3.0 < det.suspect_at < det.down_at <= 30.0 + 6.5
    assert det.status(det.suspect_at) == SUSPECT
    assert det.status(det.down_at) == DOWN


def test_deadlines_agree_with_phi_thresholds() -> None:
    cfg = DetectorConfig()
    det = beating(cfg, 20.0)
    assert det.phi(det.suspect_at) == pytest.approx(cfg.phi_suspect, rel=1e-6)
    assert det.phi(det.down_at) == pytest.approx(cfg.phi_down, rel=1e-6)


def test_healthy_jitter_does_not_trip_suspicion() -> None:
    cfg = DetectorConfig()
    det = PhiAccrual(cfg, 0.0)
    t = 0.0
    for i in range(200):
        t += 0.3 if i % 2 else 1.5  # heartbeats relayed in bursts
        assert det.status(t) == UP
        det.heartbeat(t)


def test_slow_heartbeats_widen_the_deadline() -> None:
    fast = beating(DetectorConfig(), 60.0, period=0.5)
    slow = beating(DetectorConfig(), 60.0, period=2.0)
    assert slow.down_at - slow.last > fast.down_at - fast.last


def test_reset_forgets_a_long_gap() -> None:
    det = beating(DetectorConfig(), 10.0)
    det.reset(100.0)
    assert det.status(100.5) == UP
    assert det.mean == DetectorConfig().first_interval


def test_out_of_order_time_is_ignored() -> None:
    det = beating(DetectorConfig(), 10.0)
    before = (det.last, det.mean, det.std)
    det.heartbeat(5.0)
    assert (det.last, det.mean, det.std) == before


@pytest.mark.parametrize(
    "kwargs",
    [{"phi_suspect": 9.0, "phi_down": 8.0}, {"min_std": 0.0}, {"alpha": 0.0}, {"phi_down": 20.0}],
)
def test_bad_config_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DetectorConfig(**kwargs)
