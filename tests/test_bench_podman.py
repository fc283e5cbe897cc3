"""``lazyfs bench --mode podman-pull,podman-lazyfs`` end to end on the busybox image: both runtime
modes run once over the loopback link, side by side, with sane figures; and the one-line errors
of the flags that go with them. (No podman-peer test: the peer is a benchmark tool, built by
hand, and CI would have to skip it.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from podmanenv import require_podman
from test_bench import _lazyfs, _missing_requirements, _run, _services_of

from lazyfs.bench import PODMAN_LAZYFS, PODMAN_PEER, PODMAN_PULL, mountservice
from lazyfs.bench.modes import RunMetrics
from lazyfs.bench.report import BenchResult, goals, table


def test_podman_goals_and_table() -> None:
    """Issue 10's targets, per link: podman-lazyfs against the peer (0.8) and a full pull (0.4);
    its bytes over the link against what the workload reads (1.3, worst run)."""
    runs = [
        _run("loopback", PODMAN_PULL, 5.0),
        _run("loopback", PODMAN_LAZYFS, 1.9, amplification=1.2),
        _run("loopback", PODMAN_LAZYFS, 2.1, run=2, amplification=1.4),
        _run("loopback", PODMAN_PEER, 2.5),
    ]
    found = {goal.name: (goal.value, goal.met) for goal in goals(runs)}
    assert found == {
        "loopback: podman-lazyfs / podman-peer pull + run (medians)": ("0.80", True),
        "loopback: podman-lazyfs / podman-pull pull + run (medians)": ("0.40", True),
        "podman-lazyfs bytes over the link / bytes read (worst run)": ("1.40", False),
    }
    result = BenchResult(command=["lazyfs", "bench"], machine={})
    result.runs = runs
    modes = [line.split()[2] for line in table(result).splitlines() if line.startswith("img ")]
    assert modes == [PODMAN_PULL, PODMAN_LAZYFS, PODMAN_PEER]  # side by side, in that order


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "podman-peer"], "needs --peer-store PATH"),
        (["--peer-store", "/nonexistent/stargz-store"], "is not an executable file"),
        (["--peer-store", "/etc/passwd"], "is not an executable file"),
        (["--mode", "podman-hot"], "unknown mode 'podman-hot'"),
    ],
)
def test_runtime_mode_flags_bad_input_one_line_exit_2(args: list[str], message: str) -> None:
    result = _lazyfs("bench", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert result.stdout == ""


@pytest.mark.skipif(bool(_missing_requirements()), reason=f"needs {_missing_requirements()}")
def test_bench_podman_modes_busybox_loopback(tmp_path: Path) -> None:
    require_podman()
    result = _lazyfs(
        "bench", "busybox", "--profile", "loopback", "--runs", "1", "--json", "--no-chart",
        "--mode", f"{PODMAN_PULL},{PODMAN_LAZYFS}",
        "--work-dir", str(tmp_path / "work"), "--image-dir", str(tmp_path / "images"),
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["failed_attempts"] == [], report["failed_attempts"]
    (image,) = report["images"]
    runs = {run["mode"]: run for run in report["runs"]}
    assert sorted(runs) == sorted([PODMAN_PULL, PODMAN_LAZYFS])
    for mode, run in runs.items():
        assert set(run) == set(RunMetrics.__dataclass_fields__)
        assert 0 < run["time_to_mount_s"] <= run["time_to_ready_s"] < 120, mode
        assert run["bytes_read"] == image["bytes_read"] > 0
        assert run["daemon_cpu_s"] > 0 and run["daemon_peak_rss_bytes"] > 0, mode
    full, lazy = runs[PODMAN_PULL], runs[PODMAN_LAZYFS]
    # podman pulls the gzip image whole; through the store it fetches chunks, in ranges
    assert full["link_bytes_down"] >= image["built_compressed_bytes"]
    assert full["range_requests"] == 0 and full["service_up_s"] is None
    assert 0 < lazy["link_bytes_down"] < full["link_bytes_down"]
    assert lazy["range_requests"] > 0 and lazy["lazyfs_bytes_fetched"] > 0
    assert lazy["link_bytes_down"] >= lazy["lazyfs_bytes_fetched"]
    assert lazy["service_up_s"] is not None and lazy["service_up_s"] > 0
    assert lazy["amplification"] == pytest.approx(
        lazy["link_bytes_down"] / image["bytes_read"], rel=1e-2
    )
    goals = {goal["goal"] for goal in report["goals"]}
    assert f"loopback: {PODMAN_LAZYFS} / {PODMAN_PULL} pull + run (medians)" in goals
    assert PODMAN_LAZYFS in result.stderr and PODMAN_PULL in result.stderr  # the table
    # nothing left behind: no mount, no service
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()
    assert not mountservice.lazyfs_mounts_under(tmp_path)
    assert not _services_of(tmp_path)
