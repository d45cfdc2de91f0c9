"""IdleMeter: the share of time a service waited, between two reads (the bubble gauges)."""

from __future__ import annotations

import pytest

from rollfleet import service
from rollfleet.service import IdleMeter


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: now[0])
    return now


def test_idle_share_between_reads(clock):
    meter = IdleMeter()
    clock[0] += 3  # idle 3 s
    meter.set_busy(True)
    clock[0] += 1  # busy 1 s
    meter.set_busy(False)
    assert meter.read() == pytest.approx(0.75)


def test_busy_across_a_read_counts_on_both_sides(clock):
    meter = IdleMeter()
    meter.set_busy(True)
    clock[0] += 2
    assert meter.read() == pytest.approx(0.0)
    clock[0] += 1  # still busy
    meter.set_busy(False)
    clock[0] += 3
    assert meter.read() == pytest.approx(0.75)


def test_repeated_calls_do_not_restart_the_busy_interval(clock):
    meter = IdleMeter()
    meter.set_busy(True)
    clock[0] += 1
    meter.set_busy(True)  # the worker loop reports its state every iteration
    clock[0] += 1
    meter.set_busy(False)
    meter.set_busy(False)
    clock[0] += 2
    assert meter.read() == pytest.approx(0.5)
    assert meter.read() == 0.0  # no time passed
