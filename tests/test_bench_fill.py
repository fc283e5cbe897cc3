"""The fill benchmark's figures (lazyfs/bench/fill.py), from made-up phases: no root, no link."""

from __future__ import annotations

import json

import pytest

from lazyfs.bench.fill import (
    FillResult,
    OfflineSafe,
    RateCap,
    Reads,
    _slope,
    parse_args,
    table,
    to_json,
    verdicts,
)
from lazyfs.bench.links import DEFAULT_PROFILES, LinkMeasurement, check_link
from lazyfs.errors import UsageError


def _result() -> FillResult:
    link = check_link(DEFAULT_PROFILES["edge"], LinkMeasurement(19.2e6, 0.150, 1 << 20))
    alone = Reads("alone", tuple(0.160 + i * 0.001 for i in range(20)), 0)
    during = Reads("during", tuple(0.170 + i * 0.001 for i in range(20)), 1, 30.0)
    cap = RateCap(1.2e6, 5.0, 1.21e6, 1.2e6, ((0.0, 0), (5.0, 6_000_000)))
    offline = OfflineSafe(28.0, 1.7, 61_000_000, 61_400_000)
    return FillResult(link, 63_270_000, 2.4e6, offline, ((0.0, alone, during),), cap, ("a",))


def test_verdicts_compare_with_the_baselines_of_the_same_run() -> None:
    found = {goal: (round(ratio, 3), met) for goal, ratio, _target, met in verdicts(_result())}
    assert found["time to offline-safe / (compressed bytes / link rate)"] == (1.062, True)
    p50 = found["read latency p50, reads 0 s apart, during fill / alone"]
    assert p50 == (round(0.180 / 0.170, 3), True)  # the 11th of 20 sorted, both sides
    assert found["link rate under --fill-rate / the cap"] == (1.008, True)
    text = table(_result())
    assert "[met] 1.062" in text and "1 during fill and 0 alone" in text
    document = to_json(_result(), ["--reads", "20"])
    assert json.loads(json.dumps(document))["goals"][0]["met"] is True


def test_slope_is_least_squares() -> None:
    assert _slope([(0.0, 0), (1.0, 10), (2.0, 20), (3.0, 30)]) == pytest.approx(10.0)


@pytest.mark.parametrize(
    "argv",
    [["--reads", "1"], ["--read-gaps-s", "x"], ["--cap-fraction", "1"], ["--cap-seconds", "1"]],
)
def test_bad_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(argv)
