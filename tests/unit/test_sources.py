"""Simulation sources: synthetic shapes, replay of recordings, and the --source syntax."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from capacity_agent.collectors.base import CollectorError
from capacity_agent.collectors.sources import (
    SOURCE_RULE,
    ReplayCollector,
    SourceKind,
    SourceSpec,
    SyntheticCollector,
    SyntheticKind,
    parse_source,
)
from capacity_api import gates
from capacity_api.models import Geometry, Substrate

pytestmark = pytest.mark.unit

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def window(collector: SyntheticCollector, clock: FakeClock, n: int = gates.WINDOW) -> np.ndarray:
    """n samples one second apart, as the agent would take them."""
    loads = []
    for _ in range(n):
        sample = collector.sample()
        assert 0.0 <= sample.load <= 1.0
        assert set(sample.signals) == {"cpu", "memory"}
        loads.append(sample.load)
        clock.now += 1.0
    return np.array(loads)


# ---------------------------------------------------------------------------------------------
# Synthetic shapes


@pytest.mark.parametrize("seed", range(5))
def test_steady_has_low_variance_around_base(seed: int) -> None:
    clock = FakeClock()
    u = window(SyntheticCollector("steady", seed=seed, clock=clock, base=0.4), clock)

    assert float(np.std(u)) < 0.01
    assert float(np.mean(u)) == pytest.approx(0.4, abs=0.01)
    assert gates.lambda_int(u) < 0.2  # smooth noise: never mistaken for bursts
    assert gates.gluing_delta(u) < 0.02


@pytest.mark.parametrize("seed", range(5))
def test_periodic_has_one_dominant_frequency(seed: int) -> None:
    clock = FakeClock()
    collector = SyntheticCollector(
        "periodic", seed=seed, clock=clock, base=0.5, amplitude=0.3, period=16.0
    )
    u = window(collector, clock)

    power = gates.power_spectrum(u)
    # rfft bin k is k / 64 cycles per sample, and the DC bin is dropped: a 16 s period is bin 4
    assert int(np.argmax(power)) + 1 == gates.WINDOW // 16
    assert gates.lambda1(u) > 0.9
    assert float(np.max(u)) == pytest.approx(0.8, abs=0.02)
    assert float(np.min(u)) == pytest.approx(0.2, abs=0.02)


@pytest.mark.parametrize("seed", range(5))
def test_bursty_is_mostly_low_with_one_step_spikes(seed: int) -> None:
    clock = FakeClock()
    collector = SyntheticCollector("bursty", seed=seed, clock=clock, base=0.1, amplitude=0.7)
    u = window(collector, clock, n=256)

    spikes = u > 0.1 + 0.35
    assert 0.1 < float(np.mean(spikes)) < 0.4  # mostly low
    assert float(np.median(u)) == pytest.approx(0.1, abs=0.01)
    assert float(np.max(u)) > 0.1 + 0.6 * 0.7 - 0.01
    assert not np.any(spikes[1:] & spikes[:-1])  # spikes never come back to back
    for start in range(0, 256 - 64 + 1, 64):
        assert gates.lambda_int(u[start : start + 64]) > 0.6  # above the default burst gate


@pytest.mark.parametrize("seed", range(5))
def test_ramp_rises_linearly_then_holds(seed: int) -> None:
    clock = FakeClock()
    collector = SyntheticCollector(
        "ramp", seed=seed, clock=clock, base=0.2, amplitude=0.6, period=40.0
    )
    u = window(collector, clock)

    rising, holding = u[:40], u[40:]
    slope = np.polyfit(np.arange(40), rising, 1)[0]
    assert slope == pytest.approx(0.6 / 40, rel=0.1)
    assert u[0] == pytest.approx(0.2, abs=0.01)
    assert float(np.mean(holding)) == pytest.approx(0.8, abs=0.01)
    assert float(np.std(holding)) < 0.01
    assert gates.gluing_delta(u) > 0.4


def test_ramp_starts_at_the_given_start_time() -> None:
    collector = SyntheticCollector(
        "ramp", clock=FakeClock(), base=0.0, amplitude=1.0, period=10.0, noise=0.0, start=T0 + 5
    )

    assert collector.value(T0) == 0.0
    assert collector.value(T0 + 10) == pytest.approx(0.5)
    assert collector.value(T0 + 100) == 1.0


@pytest.mark.parametrize("kind", list(SyntheticKind))
def test_same_seed_and_clock_give_the_same_samples_in_any_order(kind: SyntheticKind) -> None:
    times = [T0 + i for i in range(64)]
    a = SyntheticCollector(kind, seed=7, clock=FakeClock(), start=T0)
    b = SyntheticCollector(kind, seed=7, clock=FakeClock(), start=T0)

    forward = [a.value(t) for t in times]
    backward = [b.value(t) for t in reversed(times)][::-1]

    assert forward == backward
    other = SyntheticCollector(kind, seed=8, clock=FakeClock(), start=T0)
    assert [other.value(t) for t in times] != forward


def test_samples_follow_the_clock_and_memory_follows_cpu() -> None:
    clock = FakeClock()
    collector = SyntheticCollector("periodic", seed=1, clock=clock, memory_ratio=0.5)

    sample = collector.sample()

    assert sample.time == T0
    assert sample.substrate is Substrate.HOST
    assert sample.signals["memory"] == pytest.approx(0.5 * sample.signals["cpu"])
    assert sample.load == sample.signals["cpu"]


def test_geometry_and_capacity_defaults_and_overrides() -> None:
    default = SyntheticCollector("steady", clock=FakeClock())
    assert default.present()
    assert default.geometry() == Geometry(units=8, detail={"cpus": 8})
    assert default.capacity() == {"cpu": "8", "memory": "32Gi"}

    gpu = SyntheticCollector(
        "steady",
        substrate=Substrate.GPU,
        clock=FakeClock(),
        geometry=Geometry(units=13824, detail={"sms": 108}),
        capacity={"nvidia.com/gpu": "1"},
    )
    assert gpu.sample().substrate is Substrate.GPU
    assert gpu.geometry() == Geometry(units=13824, detail={"sms": 108})
    assert gpu.capacity() == {"nvidia.com/gpu": "1"}
    assert SyntheticCollector("steady", clock=FakeClock(), cpus=2).capacity()["cpu"] == "2"


def test_bad_synthetic_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="wobbly"):
        SyntheticCollector("wobbly", clock=FakeClock())
    with pytest.raises(ValueError, match="period"):
        SyntheticCollector("periodic", clock=FakeClock(), period=0)
    with pytest.raises(ValueError, match="burst_probability"):
        SyntheticCollector("bursty", clock=FakeClock(), burst_probability=1.5)


@given(
    kind=st.sampled_from(list(SyntheticKind)),
    seed=st.integers(min_value=0, max_value=2**32),
    base=st.floats(min_value=-1.0, max_value=2.0),
    amplitude=st.floats(min_value=-2.0, max_value=2.0),
    t=st.floats(min_value=0.0, max_value=4e9),
)
def test_every_value_is_a_valid_sample(
    kind: SyntheticKind, seed: int, base: float, amplitude: float, t: float
) -> None:
    clock = FakeClock(t)
    collector = SyntheticCollector(
        kind, seed=seed, clock=clock, base=base, amplitude=amplitude, start=0.0
    )

    sample = collector.sample()  # Sample itself refuses anything outside [0, 1]

    assert math.isfinite(sample.load)
    assert 0.0 <= sample.load <= 1.0


# ---------------------------------------------------------------------------------------------
# Replay


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(t: float, load: float, **signals: float) -> str:
    return json.dumps({"t": t, "load": load, "signals": signals})


def test_replay_plays_valid_lines_in_order_loops_and_counts_malformed_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_lines(
        tmp_path / "rec.jsonl",
        [
            "# recorded on node-a",
            record(0, 0.1, cpu=0.1),
            "",
            "{not json",
            record(1, 0.2, cpu=0.2, memory=0.15),
            json.dumps({"t": 2, "signals": {"cpu": 0.3}}),  # no load
            json.dumps({"t": 2, "load": 1.5}),  # out of range
            '{"t": 2, "load": NaN}',  # Python's json accepts NaN; a sample must not
            json.dumps({"t": 2, "load": 0.3, "signals": "cpu"}),  # signals not an object
            json.dumps({"t": 2, "load": 0.3, "signals": {"cpu": -0.1}}),
            json.dumps({"t": "2", "load": 0.3}),  # t not a number
            json.dumps([1, 2, 3]),  # not an object
            json.dumps({"t": 0.5, "load": 0.3}),  # t goes backwards
            json.dumps({"t": 3, "load": 0.4, "raw": {"rss": 1.5e9}}),
        ],
    )
    clock = FakeClock()
    caplog.set_level(logging.WARNING, logger="capacity_agent")
    collector = ReplayCollector(path, Substrate.HOST, clock)

    assert collector.present()
    loads = []
    for _ in range(7):
        sample = collector.sample()
        assert sample.time == clock.now
        loads.append(sample.load)
        clock.now += 1.0

    assert loads == [0.1, 0.2, 0.4, 0.1, 0.2, 0.4, 0.1]
    assert collector.malformed == 9
    warnings = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1  # once per file, not once per line
    assert "line 4" in warnings[0].getMessage()
    records = collector.records()
    assert records[1].signals == {"cpu": 0.2, "memory": 0.15}
    assert records[2].raw == {"rss": 1.5e9}


def test_paced_replay_follows_the_recording_timing(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "rec.jsonl", [record(10, 0.1), record(12, 0.2), record(14, 0.3)])
    clock = FakeClock()
    collector = ReplayCollector(path, clock=clock, paced=True)

    loads = []
    for _ in range(8):
        loads.append(collector.sample().load)
        clock.now += 1.0

    # records every 2 s, the agent every 1 s; the recording spans 6 s, then loops
    assert loads == [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.1, 0.1]


def test_replay_of_a_missing_file_is_absent_and_samples_fail(tmp_path: Path) -> None:
    collector = ReplayCollector(tmp_path / "nope.jsonl", clock=FakeClock())

    assert not collector.present()
    with pytest.raises(CollectorError, match="cannot read"):
        collector.sample()


def test_replay_of_only_malformed_lines_is_absent(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", ["nope", "{}", '{"t": 1}'])
    collector = ReplayCollector(path, clock=FakeClock())

    assert not collector.present()
    assert collector.malformed == 3
    with pytest.raises(CollectorError, match="no valid records"):
        collector.sample()


def test_replay_carries_substrate_geometry_and_capacity(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "db.jsonl", [record(0, 0.5, connections=0.5)])
    collector = ReplayCollector(
        path,
        Substrate.DATABASE,
        FakeClock(),
        geometry=Geometry(units=97),
        capacity={"db-connections": "97"},
    )

    sample = collector.sample()

    assert sample.substrate is Substrate.DATABASE
    assert sample.signals == {"connections": 0.5}
    assert collector.geometry() == Geometry(units=97)
    assert collector.capacity() == {"db-connections": "97"}


# ---------------------------------------------------------------------------------------------
# --source syntax


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("live", SourceSpec(SourceKind.LIVE)),
        (" live ", SourceSpec(SourceKind.LIVE)),
        ("replay:/var/rec/a.jsonl", SourceSpec(SourceKind.REPLAY, path=Path("/var/rec/a.jsonl"))),
        ("replay:rel:with:colons", SourceSpec(SourceKind.REPLAY, path=Path("rel:with:colons"))),
        ("synthetic:bursty", SourceSpec(SourceKind.SYNTHETIC, synthetic=SyntheticKind.BURSTY)),
        (
            "prometheus:http://127.0.0.1:9090",
            SourceSpec(SourceKind.PROMETHEUS, url="http://127.0.0.1:9090"),
        ),
        (
            "prometheus:https://prom.example/api/prom",
            SourceSpec(SourceKind.PROMETHEUS, url="https://prom.example/api/prom"),
        ),
    ],
)
def test_parse_source_accepts(spec: str, expected: SourceSpec) -> None:
    parsed = parse_source(spec)

    assert parsed == expected
    assert parse_source(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("", "unknown kind ''"),
        ("fake", "unknown kind 'fake'"),
        ("LIVE", "unknown kind 'LIVE'"),
        ("live:now", "'live' takes no argument"),
        ("replay", "replay needs an argument, replay:FILE"),
        ("replay:", "replay needs an argument, replay:FILE"),
        ("synthetic:", "synthetic needs an argument, synthetic:KIND"),
        ("synthetic:wobbly", "unknown synthetic kind 'wobbly'"),
        ("prometheus:", "prometheus needs an argument, prometheus:URL"),
        ("prometheus:localhost:9090", "is not a Prometheus URL"),
        ("prometheus:ftp://prom:21", "is not a Prometheus URL"),
        ("prometheus:http://", "is not a Prometheus URL"),
    ],
)
def test_parse_source_names_the_rule_it_breaks(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match="source") as excinfo:
        parse_source(spec)

    message = str(excinfo.value)
    assert why in message
    assert SOURCE_RULE in message
