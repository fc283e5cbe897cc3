"""``lazyfs bench``: link parsing, emulator validation, summaries, layering, sniffing, and one
end-to-end run of every mode on a tiny busybox image over the ``loopback`` profile."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
from lazyfs_run import ROOT

from lazyfs.bench import MODES, mountservice
from lazyfs.bench.images import changed_entries, diff_layer
from lazyfs.bench.links import (
    DEFAULT_PROFILES,
    LinkCheck,
    LinkMeasurement,
    LinkProfile,
    check_link,
    parse_link,
    parse_rate,
    parse_rtt,
    tbf_arguments,
)
from lazyfs.bench.modes import ProcessCost, RunMetrics
from lazyfs.bench.processes import stop_process
from lazyfs.bench.proxy import RequestSniffer
from lazyfs.bench.report import (
    BenchResult,
    FailedAttempt,
    from_json,
    goals,
    percentile,
    summarise,
    summary,
    table,
    to_json,
)
from lazyfs.bench.runner import ATTEMPTS, Bench, BenchConfig
from lazyfs.bench.sharing import Memory, Phase, figures, unique_bytes
from lazyfs.bench.workload import resolve_in_root
from lazyfs.errors import LazyfsError, UsageError
from lazyfs.mount.mountinfo import MountEntry

# --- --link parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rate=100mbit,rtt=50ms", LinkProfile("custom", 100_000_000, 0.05)),
        ("rtt=0.15s,rate=20Mbit,name=edge2", LinkProfile("edge2", 20_000_000, 0.15)),
        ("rate=1gbit,rtt=500us", LinkProfile("custom", 10**9, 0.0005)),
        ("rate=unlimited,rtt=0", LinkProfile("custom", None, 0.0)),
        ("rate=2.5mbit/s, rtt=80ms", LinkProfile("custom", 2_500_000, 0.08)),
    ],
)
def test_parse_link(text: str, expected: LinkProfile) -> None:
    assert parse_link(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "rate=100mbit",
        "rtt=50ms",
        "rate=100mbit,rtt=50",
        "rate=fast,rtt=50ms",
        "rate=100mbit,rtt=50ms,loss=1%",
        "rate=100mbit,rate=10mbit,rtt=5ms",
        "rate=100mbit,rtt=50ms,name=has space",
        "rate=-5mbit,rtt=50ms",
        "rate=1bit,rtt=50ms",
        "rate=100mbit,rtt=11s",
        "rate=100mbyte,rtt=1ms",
    ],
)
def test_parse_link_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_link(text)


def test_rate_and_rtt_units() -> None:
    assert parse_rate("20mbit") == 20_000_000
    assert parse_rate("500kbit") == 500_000
    assert parse_rate("none") is None
    assert parse_rtt("150ms") == pytest.approx(0.15)
    assert parse_rtt("1s") == 1.0


def test_default_profiles() -> None:
    assert DEFAULT_PROFILES["loopback"] == LinkProfile("loopback", None, 0.0)
    assert DEFAULT_PROFILES["lan"] == LinkProfile("lan", 10**9, 0.001)
    assert DEFAULT_PROFILES["wan"] == LinkProfile("wan", 10**8, 0.05)
    assert DEFAULT_PROFILES["edge"] == LinkProfile("edge", 2 * 10**7, 0.15)


def test_tbf_bucket_holds_a_gso_packet() -> None:
    arguments = tbf_arguments(20_000_000)
    burst = int(arguments[arguments.index("burst") + 1])
    limit = int(arguments[arguments.index("limit") + 1])
    assert arguments[:2] == ["rate", "20000000bit"]
    assert burst >= 64 << 10
    assert limit >= 4 * burst


# --- emulator validation ---------------------------------------------------------------------


WAN = DEFAULT_PROFILES["wan"]


@pytest.mark.parametrize(
    ("rate", "rtt", "rate_ok", "rtt_ok"),
    [
        (95e6, 0.0505, True, True),  # TCP goodput is ~96 % of the L2 rate: fine
        (90e6, 0.045, True, True),  # exactly 10 % off: still fine
        (89e6, 0.050, False, True),
        (100e6, 0.0556, True, False),
        (120e6, 0.030, False, False),
    ],
)
def test_check_link(rate: float, rtt: float, rate_ok: bool, rtt_ok: bool) -> None:
    check = check_link(WAN, LinkMeasurement(rate, rtt, 1 << 20))
    assert (check.rate_ok, check.rtt_ok, check.ok) == (rate_ok, rtt_ok, rate_ok and rtt_ok)
    assert len(check.problems()) == (not rate_ok) + (not rtt_ok)
    assert check.to_json()["ok"] == check.ok


def test_unlimited_zero_rtt_link_always_passes() -> None:
    check = check_link(DEFAULT_PROFILES["loopback"], LinkMeasurement(3e9, 0.0001, 1 << 20))
    assert check.ok and not check.problems()


# --- summaries and goals ---------------------------------------------------------------------


def _run(
    profile: str,
    mode: str,
    ready: float,
    run: int = 1,
    amplification: float = 1.0,
    mount: float = 0.1,
) -> RunMetrics:
    service_up = None if mode == "full-pull" else 0.5 + run / 10
    return RunMetrics(
        image="img", profile=profile, mode=mode, run=run, time_to_mount_s=mount,
        time_to_first_byte_s=0.2, time_to_ready_s=ready, link_bytes=10, link_bytes_down=8,
        link_bytes_up=2, requests=3, blob_requests=2, range_requests=1, bytes_read=8,
        amplification=amplification, daemon_cpu_s=0.5, daemon_peak_rss_bytes=1 << 20,
        workload_cpu_s=0.1, lazyfs_bytes_fetched=None, lazyfs_range_requests=None,
        service_up_s=service_up,
    )  # fmt: skip


def _check(profile: str, rtt_s: float) -> LinkCheck:
    return check_link(LinkProfile(profile, None, rtt_s), LinkMeasurement(1e9, rtt_s, 1 << 20))


def test_percentile_interpolates() -> None:
    assert percentile([1.0], 0.95) == 1.0
    assert percentile([1.0, 2.0, 3.0], 0.5) == 2.0
    assert percentile([3.0, 1.0, 2.0], 0.95) == pytest.approx(2.9)
    assert summarise([1.0, 2.0, 3.0, 10.0]) == {"median": 2.5, "p95": pytest.approx(8.95)}


def test_summary_groups_by_image_profile_mode() -> None:
    runs = [_run("wan", "lazy-cold", t, i) for i, t in enumerate([1.0, 2.0, 3.0])]
    runs.append(_run("wan", "full-pull", 9.0))
    rows = summary(runs)
    assert [(r["mode"], r["runs"]) for r in rows] == [("full-pull", 1), ("lazy-cold", 3)]
    assert rows[1]["time_to_ready_s"] == {"median": 2.0, "p95": pytest.approx(2.9)}
    # service up: its own figure, only for the modes that start a service
    assert rows[0]["service_up_s"] is None
    assert rows[1]["service_up_s"] == {"median": 0.6, "p95": pytest.approx(0.69)}


def test_table_and_json_carry_service_up() -> None:
    result = BenchResult(command=["lazyfs", "bench"], machine={})
    result.runs = [_run("wan", "full-pull", 9.0), _run("wan", "lazy-warm", 2.0)]
    text = table(result)
    header = next(line for line in text.splitlines() if line.startswith("image"))
    assert header.split()[-3:] == ["svc", "up", "s"]
    full, warm = [line for line in text.splitlines() if line.startswith("img ")]
    assert full.split()[-1] == "-" and warm.split()[-1] == "0.60/0.60"
    document = to_json(result)
    assert [run["service_up_s"] for run in document["runs"]] == [None, 0.6]
    assert from_json(document).runs == result.runs


def test_reports_of_older_benches_still_load() -> None:
    """A report from before the service (docs/cold-start.json) has no service_up_s."""
    document = json.loads((Path(ROOT) / "docs" / "cold-start.json").read_text())
    runs = from_json(document).runs
    assert runs and all(run.service_up_s is None for run in runs)


def test_goals() -> None:
    runs = [
        _run("wan", "full-pull", 10.0),
        _run("wan", "lazy-cold", 2.5),
        _run("edge", "full-pull", 20.0),
        _run("edge", "lazy-cold", 21.0, amplification=2.5),
        _run("wan", "lazy-prefetch", 3.5, amplification=1.0),
    ]
    found = {goal.name: goal.met for goal in goals(runs)}
    assert found == {
        "wan: lazy-cold / full-pull time-to-ready (medians)": True,
        "edge: slowest lazy-cold vs fastest full-pull": False,
        "lazy-cold bytes over the link / bytes read (worst run)": False,
        "wan: lazy-prefetch / full-pull time-to-ready (medians)": False,
        "lazy-prefetch bytes over the link / bytes read (worst run)": True,
    }


def test_service_goals_need_the_links_rtt() -> None:
    """Issue 9: mount within 0.1 s + 2 RTT (medians); warm start on loopback within 0.3 s."""
    runs = [
        _run("loopback", "lazy-warm", 0.25, mount=0.09),
        _run("loopback", "lazy-cold", 2.0, mount=0.12),
        _run("wan", "lazy-cold", 5.0, mount=0.19),
        _run("wan", "lazy-warm", 1.0, mount=0.21),
    ]
    links = [_check("loopback", 0.0), _check("wan", 0.05)]
    found = {
        goal.name: (goal.met, goal.target)
        for goal in goals(runs, links)
        if "mount" in goal.name or "lazy-warm" in goal.name
    }
    assert found == {
        "loopback: lazy-cold lazyfs mount (median)": (False, "<= 0.100 s"),
        "loopback: lazy-warm lazyfs mount (median)": (True, "<= 0.100 s"),
        "wan: lazy-cold lazyfs mount (median)": (True, "<= 0.200 s"),
        "wan: lazy-warm lazyfs mount (median)": (False, "<= 0.200 s"),
        "loopback: lazy-warm time to ready (median)": (True, "<= 0.3 s"),
    }
    assert "loopback: lazy-warm time to ready (median)" in {g.name for g in goals(runs)}


def test_process_cost_since() -> None:
    later = ProcessCost(3.5, 200).since(ProcessCost(1.0, 100))
    assert (later.cpu_s, later.peak_rss_bytes) == (2.5, 200)


def test_stop_process_signals_then_kills() -> None:
    """The signal first; SIGKILL only for a process that outlives the wait."""
    polite = subprocess.Popen(["sleep", "60"])
    assert stop_process(polite, 30.0) is False
    assert polite.returncode == -signal.SIGTERM
    assert stop_process(polite, 30.0) is False  # already gone: nothing to do
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert stubborn.stdout is not None
    stubborn.stdout.readline()  # SIGTERM is ignored from here on
    assert stop_process(stubborn, 0.2) is True
    assert stubborn.returncode == -signal.SIGKILL
    stubborn.stdout.close()


# --- retries ---------------------------------------------------------------------------------


def test_a_failed_attempt_is_tried_again_and_reported(tmp_path: Path) -> None:
    messages: list[str] = []
    bench = Bench(BenchConfig(work_dir=tmp_path), messages.append)
    outcomes: list[Exception | str] = [LazyfsError("flaky"), "ok"]

    def flaky() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    step = FailedAttempt("img", "wan", "lazy-cold", 1)
    assert bench._attempts("label", step, flaky) == "ok"
    assert bench.result.failures == [FailedAttempt("img", "wan", "lazy-cold", 1, "flaky")]
    assert any("ATTEMPT 1 FAILED: flaky" in message for message in messages)
    assert "FAILED ATTEMPTS (1" in table(bench.result)

    def always() -> str:
        raise LazyfsError("broken")

    with pytest.raises(LazyfsError, match="broken"):
        bench._attempts("label", step, always)
    assert len(bench.result.failures) == 1 + ATTEMPTS


# --- the mount service's leftovers -----------------------------------------------------------


def test_lazyfs_mounts_under_a_scope(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [
        MountEntry(tmp_path / "run" / "service" / "root", "fuse.lazyfs", "lazyfs"),
        MountEntry(tmp_path / "run" / "mnt", "fuse.lazyfs", "lazyfs"),
        MountEntry(tmp_path / "run" / "other", "tmpfs", "tmpfs"),
        MountEntry(Path("/elsewhere"), "fuse.lazyfs", "lazyfs"),
    ]
    monkeypatch.setattr("lazyfs.mount.mountinfo.mounts", lambda: entries)
    found = mountservice.lazyfs_mounts_under(tmp_path / "run")
    assert found == [tmp_path / "run" / "service" / "root", tmp_path / "run" / "mnt"]
    detached: list[Path] = []
    monkeypatch.setattr(
        "lazyfs.service.bindmounts.unmount", lambda path, lazy: detached.append(path)
    )
    mountservice.detach_mounts(found)
    assert detached == found[::-1]  # bind mounts before the root


# --- sharing figures -------------------------------------------------------------------------


def _phase(name: str, images: int, served: dict[tuple[str, str], int]) -> Phase:
    return Phase(
        name, images, 0.5, (0.3,) * images, 2.0, 100 * images, Counter(served), len(served),
        Memory(10, 20), Memory(30 * images, 40 * images), 1.0,
    )  # fmt: skip


def test_sharing_counts_unique_bytes_per_request() -> None:
    shared_blob = ("GET", "/v2/r/blobs/sha256:base")
    alone = _phase("alone", 1, {("GET", "/v2/r/manifests/v0"): 10, shared_blob: 1000})
    shared = _phase(
        "shared",
        3,
        {
            ("GET", "/v2/r/manifests/v0"): 10,
            ("GET", "/v2/r/manifests/v1"): 10,
            ("GET", "/v2/r/manifests/v2"): 10,
            shared_blob: 1010,  # fetched a little twice
        },
    )
    assert unique_bytes(alone, shared) == 1010 + 20
    found = {figure.name: figure for figure in figures(alone, shared)}
    overall = found["registry bytes, 3 images read at once"]
    assert (overall.value, overall.baseline) == (1040, 1030)
    assert found["registry bytes, 3 images, for what image 0 also needs"].ratio == pytest.approx(
        1020 / 1010
    )
    assert found["service RSS, 3 images mounted and read"].ratio == 3.0


# --- the delay proxy's request sniffer -------------------------------------------------------


def test_sniffer_counts_requests_across_segments() -> None:
    seen: list[tuple[str, str, bool]] = []
    sniffer = RequestSniffer(lambda method, path, ranged: seen.append((method, path, ranged)))
    stream = (
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /v2/r/blobs/sha256:ab HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n"
        b"PUT /v2/r/manifests/t HTTP/1.1\r\nContent-Length: 5\r\n\r\nHELLO"
        b"HEAD /v2/r/manifests/t HTTP/1.1\r\n\r\n"
    )
    for index in range(0, len(stream), 7):
        sniffer.feed(stream[index : index + 7])
    assert seen == [
        ("GET", "/v2/", False),
        ("GET", "/v2/r/blobs/sha256:ab", True),
        ("PUT", "/v2/r/manifests/t", False),
        ("HEAD", "/v2/r/manifests/t", False),
    ]


def test_sniffer_gives_up_on_garbage() -> None:
    sniffer = RequestSniffer(lambda *_: None)
    sniffer.feed(b"\x16\x03\x01 not http\r\n\r\n")
    assert not sniffer.enabled


def test_proxy_holds_segments_for_the_rtt() -> None:
    """The proxy on loopback (no namespace): an echo costs the RTT, a connection one more."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = subprocess.Popen(
        [sys.executable, "-m", "lazyfs.bench.proxy", "--route", f"p=127.0.0.1:{port}=probe",
         "--rtt", "0.04"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proxy.stdout is not None and proxy.stdin is not None
        assert json.loads(proxy.stdout.readline()) == {"ready": True}
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.monotonic()
            sock.sendall(b"echo\nx")
            assert sock.recv(1) == b"x"
            first = time.monotonic() - started
            started = time.monotonic()
            sock.sendall(b"y")
            assert sock.recv(1) == b"y"
            second = time.monotonic() - started
        assert 0.075 <= first <= 0.2  # handshake RTT + request RTT
        assert 0.038 <= second <= 0.08
        proxy.stdin.write("stats\n")
        proxy.stdin.flush()
        counters = json.loads(proxy.stdout.readline())["p"]
        assert counters["bytes_up"] == 7 and counters["bytes_down"] == 2
        assert counters["connections"] == 1
    finally:
        proxy.stdin.close()  # type: ignore[union-attr]
        proxy.wait(10)


# --- image layering and chroot paths ---------------------------------------------------------


def _tar(path: Path, entries: dict[str, bytes | str | None]) -> None:
    """bytes: a file; str: a hard link to that name; None: a directory."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, value in entries.items():
            info = tarfile.TarInfo("./" + name)
            info.mtime = 1
            if value is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            elif isinstance(value, str):
                info.type, info.linkname = tarfile.LNKTYPE, "./" + value
                archive.addfile(info)
            else:
                info.size = len(value)
                archive.addfile(info, io.BytesIO(value))


def test_changed_entries_keeps_hard_links_with_their_targets() -> None:
    base = {"a": "1", "b": "2", "l": "3", "gone": "4"}
    full = {"a": "1", "b": "2*", "l": "3", "new": "5"}
    emit, whiteouts = changed_entries(base, full, {"l": "b"})
    assert emit == {"b", "l", "new"}
    assert whiteouts == ["gone"]


def test_diff_layer(tmp_path: Path) -> None:
    _tar(tmp_path / "base.tar", {"etc": None, "etc/keep": b"k", "etc/old": b"o", "dev": None})
    _tar(
        tmp_path / "full.tar",
        {"etc": None, "etc/keep": b"k", "usr": None, "usr/new": b"n", "dev": None},
    )
    diff_layer(tmp_path / "base.tar", tmp_path / "full.tar", tmp_path / "layer.tar")
    with tarfile.open(tmp_path / "layer.tar") as layer:
        names = layer.getnames()
    assert names == ["usr", "usr/new", "etc/.wh.old"]


def test_resolve_in_root(tmp_path: Path) -> None:
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "python3.11").write_text("")
    (tmp_path / "usr" / "bin" / "python3").symlink_to("python3.11")
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "usr" / "bin" / "abs").symlink_to("/bin/python3")
    assert resolve_in_root(tmp_path, "/bin/python3") == tmp_path / "usr/bin/python3.11"
    assert resolve_in_root(tmp_path, "/usr/bin/abs") == tmp_path / "usr/bin/python3.11"
    assert resolve_in_root(tmp_path, "/../../bin/../bin/python3") == tmp_path / "usr/bin/python3.11"


# --- the command line ------------------------------------------------------------------------


def _lazyfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lazyfs", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "moon"], "unknown link profile 'moon'"),
        (["--link", "rate=10mbit"], "malformed --link"),
        (["--link", "rate=10mbit,rtt=5ms", "--link", "rate=1mbit,rtt=5ms"], "named twice"),
        (["no-such-image"], "unknown image 'no-such-image'"),
        (["oci:/nonexistent/layout"], "no OCI layout"),
        (["--runs", "0"], "--runs"),
        (["--mode", "lazy-hot"], "unknown mode"),
        (["--registry", "not a registry"], "expected HOST:PORT"),
        (["python", "gcc", "--workload", "true"], "one image"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = _lazyfs("bench", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert result.stdout == ""


# --- end to end ------------------------------------------------------------------------------


def _missing_requirements() -> list[str]:
    missing = [tool for tool in ("docker-registry", "skopeo", "umoci", "ip", "tc", "unshare")]
    missing = [tool for tool in missing if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    if not os.path.exists("/bin/busybox"):
        missing.append("busybox-static")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        missing.append("matplotlib (pip install -e '.[bench]')")
    return missing


@pytest.mark.skipif(bool(_missing_requirements()), reason=f"needs {_missing_requirements()}")
def test_bench_busybox_loopback_all_modes(tmp_path: Path) -> None:
    chart = tmp_path / "chart.png"
    namespaces_before = set(_netns_names())
    result = _lazyfs(
        "bench", "busybox", "--profile", "loopback", "--runs", "1", "--json",
        "--chart", str(chart), "--work-dir", str(tmp_path / "work"),
        "--image-dir", str(tmp_path / "images"),
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["chart"] == str(chart)
    assert "lazy-cold" in result.stderr and "emulated links" in result.stderr  # the table
    assert [link["profile"] for link in report["links"]] == ["loopback"]
    assert report["links"][0]["ok"] is True
    (image,) = report["images"]
    assert image["name"] == "busybox" and 0 < image["bytes_read"] < image["image_bytes"]
    runs = {run["mode"]: run for run in report["runs"]}
    assert sorted(runs) == sorted(MODES)
    expected_fields = set(RunMetrics.__dataclass_fields__)
    for mode, run in runs.items():
        assert set(run) == expected_fields
        assert 0 < run["time_to_mount_s"] <= run["time_to_first_byte_s"] <= run["time_to_ready_s"]
        assert run["bytes_read"] == image["bytes_read"]
        assert run["daemon_cpu_s"] > 0 and run["daemon_peak_rss_bytes"] > 0, mode
        # every lazy mode started its own service first, outside its time to ready
        assert (run["service_up_s"] is None) == (mode == "full-pull"), mode
        if run["service_up_s"] is not None:
            assert 0 < run["service_up_s"] < 60
    assert "svc up s" in result.stderr
    assert report["failed_attempts"] == [], report["failed_attempts"]
    # full pull fetches the whole gzip image; lazy-cold some chunks, with ranges; warm nothing
    assert runs["full-pull"]["link_bytes_down"] >= image["built_compressed_bytes"]
    assert runs["full-pull"]["range_requests"] == 0
    cold = runs["lazy-cold"]
    assert 0 < cold["link_bytes_down"] < image["chunked_compressed_bytes"]
    assert cold["range_requests"] > 0
    assert cold["amplification"] == pytest.approx(
        cold["link_bytes_down"] / image["bytes_read"], rel=1e-2
    )
    # the proxy's count and lazyfs's own agree on the range requests (headers aside, bytes too)
    assert cold["range_requests"] >= cold["lazyfs_range_requests"] > 0
    assert runs["lazy-warm"]["blob_requests"] == 0
    # lazy-prefetch mounts the image converted with the profile a cold start recorded
    assert image["profile_reads"] > 0 and image["profile_bytes"] > 0
    prefetch = runs["lazy-prefetch"]
    assert 0 < prefetch["link_bytes_down"] < image["chunked_compressed_bytes"]
    for summary_row in report["summary"]:
        for metric in ("time_to_ready_s", "link_bytes", "amplification", "daemon_cpu_s"):
            assert set(summary_row[metric]) == {"median", "p95"}
    assert set(_netns_names()) <= namespaces_before  # its namespace is gone
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()  # and its mounts
    assert not mountservice.lazyfs_mounts_under(tmp_path)
    assert not _services_of(tmp_path)  # and every service it started


def _services_of(directory: Path) -> list[str]:
    """Command lines of live `lazyfs serve` processes with a path under ``directory``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [part.decode(errors="replace") for part in argv]
        if "serve" in text and any(part.startswith(str(directory)) for part in text):
            found.append(" ".join(text))
    return found


@pytest.mark.skipif(bool(_missing_requirements()), reason=f"needs {_missing_requirements()}")
def test_sharing_busybox_variants(tmp_path: Path) -> None:
    """python -m lazyfs.bench.sharing on busybox variants: one service, 3 images at once."""
    namespaces_before = set(_netns_names())
    done = subprocess.run(
        [sys.executable, "-m", "lazyfs.bench.sharing", "--image", "busybox", "--images", "3",
         "--json", "--work-dir", str(tmp_path / "work"), "--image-dir", str(tmp_path / "images")],
        capture_output=True, text=True, timeout=240, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    alone, shared = report["phases"]
    assert (alone["images"], shared["images"]) == (1, 3)
    assert len(shared["mount_s"]) == 3 and all(t > 0 for t in shared["mount_s"])
    assert shared["bytes_read"] == 3 * alone["bytes_read"] > 0
    # the layers all variants share are not fetched once per image
    assert 0 < shared["registry_bytes"] < 1.5 * alone["registry_bytes"]
    assert shared["rss_after_reads_bytes"] > 0
    assert report["figures"][0]["baseline"].startswith("unique bytes")
    assert report["link"]["profile"] == "loopback" and report["link"]["ok"] is True
    assert "registry bytes <= 1.02 x unique bytes" in done.stderr
    assert not mountservice.lazyfs_mounts_under(tmp_path)
    assert not _services_of(tmp_path)
    assert set(_netns_names()) <= namespaces_before


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if line.split()]
