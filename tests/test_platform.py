"""lazyfs.model.platform: parsing, host detection, OCI JSON and containerd-like matching."""

from __future__ import annotations

import platform as stdlib_platform

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazyfs.errors import ManifestError, UsageError
from lazyfs.model.platform import Platform


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("linux/amd64", Platform("linux", "amd64")),
        ("linux/arm64/v8", Platform("linux", "arm64", "v8")),
        ("linux/arm/v7", Platform("linux", "arm", "v7")),
        ("linux/arm/7", Platform("linux", "arm", "v7")),
        ("linux/arm64/v8.0", Platform("linux", "arm64", "v8")),
        ("Linux/AMD64", Platform("linux", "amd64")),
        (" linux/amd64 ", Platform("linux", "amd64")),
        ("linux/x86_64", Platform("linux", "amd64")),
        ("linux/aarch64", Platform("linux", "arm64")),
        ("linux/armhf", Platform("linux", "arm", "v7")),
        ("linux/armel", Platform("linux", "arm", "v6")),
        ("linux/i386", Platform("linux", "386")),
        ("macos/arm64", Platform("darwin", "arm64")),
        ("windows/amd64", Platform("windows", "amd64")),
        ("linux/riscv64", Platform("linux", "riscv64")),
    ],
)
def test_parse(text: str, expected: Platform) -> None:
    assert Platform.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "linux", "linux/", "/amd64", "linux/amd64/", "linux/arm/v7/x", "linux amd64", "li nux/a"],
)
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(UsageError, match="invalid platform"):
        Platform.parse(text)


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "linux/amd64"),
        ("aarch64", "linux/arm64/v8"),
        ("arm64", "linux/arm64/v8"),
        ("armv7l", "linux/arm/v7"),
        ("armv6l", "linux/arm/v6"),
        ("i686", "linux/386"),
        ("ppc64le", "linux/ppc64le"),
        ("s390x", "linux/s390x"),
        ("riscv64", "linux/riscv64"),
        ("loongarch64", "linux/loong64"),
        ("weird9000", "linux/weird9000"),
    ],
)
def test_host(monkeypatch: pytest.MonkeyPatch, machine: str, expected: str) -> None:
    monkeypatch.setattr(stdlib_platform, "machine", lambda: machine)
    assert str(Platform.host()) == expected


def test_host_on_this_machine_is_linux() -> None:
    assert Platform.host().os == "linux"


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"os": "linux", "architecture": "amd64"}, Platform("linux", "amd64")),
        ({"os": "linux", "architecture": "arm", "variant": "v7"}, Platform("linux", "arm", "v7")),
        ({"os": "linux", "architecture": "arm64", "variant": ""}, Platform("linux", "arm64")),
        (
            {"os": "windows", "architecture": "amd64", "os.version": "10.0.17763.1"},
            Platform("windows", "amd64"),
        ),
    ],
)
def test_from_json(obj: dict[str, object], expected: Platform) -> None:
    assert Platform.from_json(obj) == expected


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"os": "linux"},
        {"architecture": "amd64"},
        {"os": "", "architecture": "amd64"},
        {"os": "linux", "architecture": 7},
        {"os": "linux", "architecture": "arm", "variant": 7},
    ],
)
def test_from_json_rejects_malformed(obj: dict[str, object]) -> None:
    with pytest.raises(ManifestError):
        Platform.from_json(obj)


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        ("linux/amd64", "linux/amd64", True),
        ("linux/arm64/v8", "linux/arm64", True),
        ("linux/arm64", "linux/arm64/v8", True),
        ("linux/arm/v7", "linux/arm", True),
        ("linux/amd64", "linux/amd64/v1", True),
        ("linux/arm/v6", "linux/arm", False),
        ("linux/arm/v6", "linux/arm/v7", False),
        ("linux/arm64/v9", "linux/arm64", False),
        ("linux/amd64/v3", "linux/amd64", False),
        ("linux/amd64", "linux/arm64", False),
        ("linux/amd64", "windows/amd64", False),
        ("linux/arm64", "linux/arm", False),
    ],
)
def test_matches(left: str, right: str, expected: bool) -> None:
    a, b = Platform.parse(left), Platform.parse(right)
    assert a.matches(b) is expected
    assert b.matches(a) is expected


def test_matches_normalises_json_variants() -> None:
    index_entry = Platform.from_json({"os": "linux", "architecture": "arm64", "variant": "8"})
    assert Platform("linux", "arm64", "v8").matches(index_entry)


def test_str() -> None:
    assert str(Platform("linux", "arm64", "v8")) == "linux/arm64/v8"
    assert str(Platform("linux", "amd64")) == "linux/amd64"


_words = st.from_regex(r"[a-z0-9_][a-z0-9_.-]{0,8}", fullmatch=True)


@given(
    os_name=_words,
    architecture=_words,
    variant=st.none() | st.from_regex(r"v[0-9]{1,2}", fullmatch=True),
)
def test_canonical_platforms_round_trip(
    os_name: str, architecture: str, variant: str | None
) -> None:
    platform = Platform.parse(f"{os_name}/{architecture}" + (f"/{variant}" if variant else ""))
    assert Platform.parse(str(platform)) == platform
    assert platform.matches(platform)
