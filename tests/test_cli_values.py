"""Bad option values, for every subcommand: one line, exit 2, never a traceback; and the flag
conventions skopeo and podman users type without thinking."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyfs.cli.main import _with_boolean_values, main

BAD_SIZES = ["1e400", "nan", "inf", "-1", "0", "12Q", ""]
BAD_DURATIONS = ["nan", "inf", "-1", "0", "soon", "1e400"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    return code, err


def _assert_one_line_usage_error(code: int, err: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazyfs: error: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize("value", BAD_SIZES)
@pytest.mark.parametrize(
    "command",
    [
        ["mount", "127.0.0.1:5000/a:b", "/tmp", "--cache-size"],
        ["serve", "--cache-size"],
        ["serve", "--max-toc-bytes"],
        ["serve", "--max-image-toc-bytes"],
        ["serve", "--fill-rate"],
    ],
)
def test_bad_sizes(command: list[str], value: str, capsys: pytest.CaptureFixture[str]) -> None:
    _assert_one_line_usage_error(*_run([*command, value], capsys))


@pytest.mark.parametrize("value", BAD_DURATIONS)
@pytest.mark.parametrize(
    "command",
    [
        ["mount", "127.0.0.1:5000/a:b", "/tmp", "--read-timeout"],
        ["mount", "127.0.0.1:5000/a:b", "/tmp", "--service-idle-exit"],
        ["serve", "--idle-exit"],
        ["serve", "--lock-wait"],
    ],
)
def test_bad_durations(command: list[str], value: str, capsys: pytest.CaptureFixture[str]) -> None:
    _assert_one_line_usage_error(*_run([*command, value], capsys))


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--metrics-addr", "nowhere"],
        ["serve", "--metrics-addr", "127.0.0.1:99999"],
        ["serve", "--max-fetches", "0"],
        ["serve", "--worker-threads", "-3"],
        ["mount", "127.0.0.1:5000/a:b", "/tmp", "--platform", "not/a/plat/form"],
        ["mount", "127.0.0.1:5000/a:b", "/tmp", "--tls-verify=maybe"],
        ["mount", "UPPER/Case:x", "/tmp"],
        ["mount", "127.0.0.1:5000/a:b", "/no/such/dir"],
        ["convert", "oci-archive:/x", "127.0.0.1:5000/a:b"],
        ["cache", "du", "--cache-dir", "/no/such/cache"],
        ["cache", "explode"],
        ["stats", "/no/such/mount"],
        ["umount", "/no/such/mount"],
    ],
)
def test_bad_values_are_one_line_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    _assert_one_line_usage_error(*_run(argv, capsys))


def test_creds_without_password_and_no_terminal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = _run(["mount", "--creds", "bob", "127.0.0.1:1/a:b", str(tmp_path)], capsys)
    _assert_one_line_usage_error(code, err)
    assert "no terminal" in err


def test_bare_tls_verify_does_not_swallow_the_reference() -> None:
    assert _with_boolean_values(["mount", "--tls-verify", "reg/x:y", "/mnt"]) == [
        "mount",
        "--tls-verify=true",
        "reg/x:y",
        "/mnt",
    ]
    assert _with_boolean_values(["--tls-verify=false", "--", "--tls-verify"]) == [
        "--tls-verify=false",
        "--",
        "--tls-verify",
    ]
