"""Tests for lazyfs.model.reference: docker's normalisation, rejection rules and round-tripping."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lazyfs.errors import InvalidReferenceError, UsageError
from lazyfs.model.digest import Digest
from lazyfs.model.reference import Reference

HEX64 = "0123456789abcdef" * 4
SHA256 = f"sha256:{HEX64}"
SHA512 = f"sha512:{HEX64 * 2}"

# (input, registry, repository, tag, digest)
VALID_CASES: list[tuple[str, str, str, str | None, str | None]] = [
    ("ubuntu", "docker.io", "library/ubuntu", None, None),
    ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
    (f"ubuntu@{SHA256}", "docker.io", "library/ubuntu", None, SHA256),
    ("foo/bar", "docker.io", "foo/bar", None, None),
    (f"foo/bar:tag@{SHA256}", "docker.io", "foo/bar", "tag", SHA256),
    ("docker.io/ubuntu", "docker.io", "library/ubuntu", None, None),
    ("docker.io/library/ubuntu:latest", "docker.io", "library/ubuntu", "latest", None),
    ("index.docker.io/ubuntu", "docker.io", "library/ubuntu", None, None),
    ("index.docker.io/foo/bar:1", "docker.io", "foo/bar", "1", None),
    ("localhost/foo", "localhost", "foo", None, None),
    ("localhost:5000/foo", "localhost:5000", "foo", None, None),
    ("localhost:5000/foo/bar:v1", "localhost:5000", "foo/bar", "v1", None),
    ("a.b/c", "a.b", "c", None, None),
    ("quay.io/coreos/etcd:v3.5.0", "quay.io", "coreos/etcd", "v3.5.0", None),
    ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", None, None),
    ("192.168.1.1/repo:5050", "192.168.1.1", "repo", "5050", None),
    ("[::1]:5000/x:y", "[::1]:5000", "x", "y", None),
    ("[::1]/x", "[::1]", "x", None, None),
    (f"[2001:db8::1]:5000/repo:tag@{SHA256}", "[2001:db8::1]:5000", "repo", "tag", SHA256),
    (f"host:5000/a/b:t@{SHA512}", "host:5000", "a/b", "t", SHA512),
    ("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com", "myimage", "xn--n3h.com", None),
    ("sub-dom1.foo.com/bar/baz/quux", "sub-dom1.foo.com", "bar/baz/quux", None, None),
    # Separators: one '.', one or two '_', any run of '-'.
    ("a/b.c_d__e---f", "docker.io", "a/b.c_d__e---f", None, None),
    ("foo:Uppercase_Tag-1.0", "docker.io", "library/foo", "Uppercase_Tag-1.0", None),
    # Docker reads an uppercase first component as a registry host (splitDockerDomain).
    ("Foo/bar", "Foo", "bar", None, None),
    # Without a '/', "localhost:5000" is repository "localhost" with tag "5000", as in docker.
    ("localhost:5000", "docker.io", "library/localhost", "5000", None),
    ("localhost", "docker.io", "library/localhost", None, None),
    # A 64-hex string is only refused on its own; with a tag it is a repository name.
    (f"{HEX64}:t", "docker.io", f"library/{HEX64}", "t", None),
    ("x.io/" + "a" * 255, "x.io", "a" * 255, None, None),
    ("foo:" + "t" * 128, "docker.io", "library/foo", "t" * 128, None),
]

INVALID_CASES: list[tuple[str, str]] = [
    ("", "empty"),
    ("foo/Bar", "lowercase"),
    ("docker.io/Ubuntu", "lowercase"),
    ("Uppercase:tag", "lowercase"),
    ("test:5000/Uppercase/lowercase:tag", "lowercase"),
    ("ubuntu@sha256:abc", "digest"),
    (f"ubuntu@sha256:{HEX64.upper()}", "digest"),
    (f"ubuntu@md5:{HEX64}", "digest"),
    (f"ubuntu@sha256:{HEX64}\n", "digest"),
    ("ubuntu@", "digest"),
    ("ubuntu:", "tag"),
    ("ubuntu:-x", "tag"),
    ("ubuntu:.x", "tag"),
    ("ubuntu:" + "t" * 129, "tag"),
    # "ubuntu:ta" has a ':' so docker reads it as a registry host, which is malformed.
    ("ubuntu:ta/g", "registry"),
    ("a" * 256, "255"),
    ("x.io/" + "a" * 256, "255"),
    ("foo/" + "a/" * 126 + "aa", "255"),
    (HEX64, "image ID"),
    (":justtag", "repository"),
    (f"@{SHA256}", "repository"),
    ("foo//bar", "repository"),
    ("foo/", "repository"),
    ("/foo", "repository"),
    ("-foo", "repository"),
    ("foo-", "repository"),
    ("foo..bar", "repository"),
    ("foo___bar", "repository"),
    ("aa/asdf$$^/aa", "repository"),
    ("foo bar", "repository"),
    ("foo_bar.com/x", "registry"),
    ("-host.io/x", "registry"),
    ("host:port/x", "registry"),
    ("[fe80::1%eth0]:5000/repo", "registry"),
    ("[2001:db8::1]:5000", "repository"),
    ("ünïcode.io/x", "registry"),
    (f"foo@{SHA256}@{SHA256}", "digest"),
]


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), VALID_CASES)
def test_parse_normalises_like_docker(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = Reference.parse(text)
    assert ref.registry == registry
    assert ref.repository == repository
    assert ref.tag == tag
    assert ref.digest == (Digest.parse(digest) if digest else None)


@pytest.mark.parametrize(("text", "fragment"), INVALID_CASES)
def test_parse_rejects_what_docker_rejects(text: str, fragment: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        Reference.parse(text)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_invalid_reference_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        Reference.parse("Not Valid")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ubuntu", "docker.io/library/ubuntu:latest"),
        ("ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
        (f"ubuntu@{SHA256}", f"docker.io/library/ubuntu@{SHA256}"),
        (f"host:5000/a/b:t@{SHA256}", f"host:5000/a/b:t@{SHA256}"),
        ("[::1]:5000/x", "[::1]:5000/x:latest"),
    ],
)
def test_str_is_fully_qualified(text: str, expected: str) -> None:
    assert str(Reference.parse(text)) == expected


@pytest.mark.parametrize(
    ("text", "api_host"),
    [
        ("ubuntu", "registry-1.docker.io"),
        ("docker.io/foo/bar", "registry-1.docker.io"),
        ("index.docker.io/foo/bar", "registry-1.docker.io"),
        ("quay.io/a/b", "quay.io"),
        ("localhost:5000/a", "localhost:5000"),
        ("[::1]:5000/a", "[::1]:5000"),
    ],
)
def test_api_host(text: str, api_host: str) -> None:
    assert Reference.parse(text).api_host == api_host


@pytest.mark.parametrize(
    ("text", "selector"),
    [
        ("ubuntu", "latest"),
        ("ubuntu:22.04", "22.04"),
        (f"ubuntu@{SHA256}", SHA256),
        (f"ubuntu:22.04@{SHA256}", SHA256),
    ],
)
def test_selector_prefers_digest_then_tag_then_latest(text: str, selector: str) -> None:
    assert Reference.parse(text).selector == selector


@pytest.mark.parametrize(
    ("text", "loopback"),
    [
        ("localhost/a", True),
        ("localhost:5000/a", True),
        ("LOCALHOST:5000/a", True),
        ("127.0.0.1/a", True),
        ("127.1.2.3:5000/a", True),
        ("[::1]/a", True),
        ("[::1]:5000/a", True),
        ("[0:0:0:0:0:0:0:1]:5000/a", True),
        ("ubuntu", False),
        ("quay.io/a", False),
        ("128.0.0.1:5000/a", False),
        ("10.0.0.1:5000/a", False),
        ("[2001:db8::1]:5000/a", False),
        ("localhost.example.com/a", False),
        ("localhost", False),
    ],
)
def test_is_loopback(text: str, loopback: bool) -> None:
    assert Reference.parse(text).is_loopback is loopback


def test_with_digest_keeps_tag() -> None:
    ref = Reference.parse("quay.io/a/b:v1")
    pinned = ref.with_digest(Digest.parse(SHA256))
    assert pinned.tag == "v1"
    assert str(pinned) == f"quay.io/a/b:v1@{SHA256}"
    assert ref.digest is None


def test_with_tag_replaces_and_clears_tag() -> None:
    ref = Reference.parse("quay.io/a/b:v1")
    assert ref.with_tag("v2").tag == "v2"
    assert ref.with_tag(None).tag is None
    assert str(ref.with_tag(None)) == "quay.io/a/b:latest"


def test_with_tag_validates() -> None:
    with pytest.raises(InvalidReferenceError):
        Reference.parse("quay.io/a/b").with_tag("bad tag")


def test_direct_construction_validates() -> None:
    with pytest.raises(InvalidReferenceError):
        Reference("quay.io", "Upper")
    with pytest.raises(InvalidReferenceError):
        Reference("bad_host.io", "a")


def test_long_hostile_input_is_rejected_quickly() -> None:
    # Guards against catastrophic regex backtracking on long near-miss inputs.
    for text in ("a" * 5000 + "!", "a." * 3000 + "-/x", "a/" * 3000 + "A", "a-" * 3000 + "-"):
        with pytest.raises(InvalidReferenceError):
            Reference.parse(text)


# --- property tests -------------------------------------------------------------------------

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_HOST_CHARS = _ALNUM + "ABCXYZ"


@st.composite
def path_components(draw: st.DrawFn) -> str:
    words = draw(st.lists(st.text(_ALNUM, min_size=1, max_size=6), min_size=1, max_size=3))
    text = words[0]
    for word in words[1:]:
        text += draw(st.sampled_from([".", "_", "__", "-", "--", "---"])) + word
    return text


@st.composite
def domain_labels(draw: st.DrawFn) -> str:
    inner = draw(st.text(_HOST_CHARS + "-", max_size=6))
    edge = st.text(_HOST_CHARS, min_size=1, max_size=1)
    return draw(edge) + (inner + draw(edge) if inner else "")


@st.composite
def registries(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["dotted", "ipv4", "ipv6", "localhost", "port-only"]))
    if kind == "dotted":
        host = ".".join(draw(st.lists(domain_labels(), min_size=2, max_size=4)))
    elif kind == "ipv4":
        host = ".".join(str(draw(st.integers(0, 255))) for _ in range(4))
    elif kind == "ipv6":
        host = "[" + draw(st.sampled_from(["::1", "2001:db8::1", "fe80::aB:1", "::"])) + "]"
    elif kind == "localhost":
        host = "localhost"
    else:
        host = draw(domain_labels())
    port = draw(st.none() | st.integers(0, 65535))
    if kind == "port-only" and port is None:
        port = 5000
    return host if port is None else f"{host}:{port}"


tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
digests = st.sampled_from(["sha256", "sha512"]).flatmap(
    lambda algorithm: st.binary(
        min_size=32 if algorithm == "sha256" else 64,
        max_size=32 if algorithm == "sha256" else 64,
    ).map(lambda raw: Digest(algorithm, raw.hex()))
)


@given(
    registry=st.none() | st.just("docker.io") | registries(),
    components=st.lists(path_components(), min_size=1, max_size=4),
    tag=st.none() | tags,
    digest=st.none() | digests,
)
def test_generated_references_parse_and_round_trip(
    registry: str | None, components: list[str], tag: str | None, digest: Digest | None
) -> None:
    repository = "/".join(components)
    assume(registry != "index.docker.io")
    if registry is None:
        # Without an explicit registry the first component must not look like one.
        first = components[0]
        assume(len(components) == 1 or ("." not in first and first != "localhost"))
    text = repository if registry is None else f"{registry}/{repository}"
    text += f":{tag}" if tag is not None else ""
    text += f"@{digest}" if digest is not None else ""
    assume(text != HEX64)

    ref = Reference.parse(text)

    expected_registry = registry or "docker.io"
    if expected_registry == "docker.io" and "/" not in repository:
        repository = f"library/{repository}"
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        expected_registry,
        repository,
        tag,
        digest,
    )
    reparsed = Reference.parse(str(ref))
    if tag is None and digest is None:
        assert reparsed == ref.with_tag("latest")
    else:
        assert reparsed == ref


@given(st.text(alphabet="abAB09:/@._-[]%", max_size=40))
def test_arbitrary_text_either_parses_stably_or_raises_invalid(text: str) -> None:
    try:
        ref = Reference.parse(text)
    except InvalidReferenceError:
        return
    assert str(Reference.parse(str(ref))) == str(ref)
