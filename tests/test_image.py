"""lazyfs.model.manifests: parsing, writing and selecting manifests, indexes and configs."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lazyfs.errors import ManifestError, UnsupportedMediaTypeError
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import (
    ALL_MANIFEST_TYPES,
    DOCKER_CONFIG,
    DOCKER_FOREIGN_LAYER_TAR_GZIP,
    DOCKER_LAYER_TAR_GZIP,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2,
    DOCKER_SCHEMA1_SIGNED_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_NONDIST_TAR,
    OCI_LAYER_NONDIST_TAR_GZIP,
    OCI_LAYER_NONDIST_TAR_ZSTD,
    OCI_LAYER_TAR,
    OCI_LAYER_TAR_GZIP,
    OCI_LAYER_TAR_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    canonical_json,
    layer_compression,
    parse_manifest_or_index,
)
from lazyfs.model.platform import Platform

D1 = Digest.of(b"one")
D2 = Digest.of(b"two")
D3 = Digest.of(b"three")


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _descriptor_json(
    media_type: str, digest: Digest, size: int = 10, **more: object
) -> dict[str, object]:
    return {"mediaType": media_type, "digest": str(digest), "size": size, **more}


def _manifest_json(media_type: str | None = OCI_MANIFEST, **more: object) -> dict[str, object]:
    doc: dict[str, object] = {"schemaVersion": 2}
    if media_type is not None:
        doc["mediaType"] = media_type
    doc["config"] = _descriptor_json(OCI_CONFIG, D1)
    doc["layers"] = [_descriptor_json(OCI_LAYER_TAR_GZIP, D2, 100)]
    return {**doc, **more}


def _entry(digest: Digest, platform: dict[str, object], **annotations: str) -> dict[str, object]:
    entry = _descriptor_json(OCI_MANIFEST, digest, platform=platform)
    if annotations:
        entry["annotations"] = annotations
    return entry


# --- media types and compression ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        (OCI_LAYER_TAR, "none"),
        (OCI_LAYER_NONDIST_TAR, "none"),
        (OCI_LAYER_TAR_GZIP, "gzip"),
        (OCI_LAYER_NONDIST_TAR_GZIP, "gzip"),
        (DOCKER_LAYER_TAR_GZIP, "gzip"),
        (DOCKER_FOREIGN_LAYER_TAR_GZIP, "gzip"),
        (OCI_LAYER_TAR_ZSTD, "zstd"),
        (OCI_LAYER_NONDIST_TAR_ZSTD, "zstd"),
    ],
)
def test_layer_compression(media_type: str, expected: str) -> None:
    assert layer_compression(media_type) == expected


@pytest.mark.parametrize(
    "media_type", [OCI_CONFIG, "application/vnd.oci.image.layer.v1.tar+bzip2", ""]
)
def test_layer_compression_rejects_other_types(media_type: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError):
        layer_compression(media_type)


def test_all_manifest_types_lists_oci_first() -> None:
    assert ALL_MANIFEST_TYPES == (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V2)


# --- canonical JSON ----------------------------------------------------------------------------


def test_canonical_json_is_compact_ordered_utf8() -> None:
    assert canonical_json({"b": 1, "a": [1, "ü"], "c": {}}) == '{"b":1,"a":[1,"ü"],"c":{}}'.encode()


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ManifestError):
        canonical_json({"x": float("nan")})


# --- descriptors -------------------------------------------------------------------------------


def test_descriptor_keeps_unknown_fields_and_sorts_annotations() -> None:
    raw = _descriptor_json(
        OCI_LAYER_TAR_GZIP,
        D1,
        artifactType="application/example",
        urls=["https://example.com/blob"],
        annotations={"z": "1", "a": "2"},
        data="b25l",
        platform={
            "os": "windows",
            "architecture": "amd64",
            "os.version": "10.0.17763",
            "features": ["x"],
        },
        custom={"kept": True},
    )
    descriptor = Descriptor.from_json(raw)
    assert descriptor.platform == Platform("windows", "amd64")
    assert list(descriptor.annotations) == ["a", "z"]
    out = descriptor.to_json()
    assert list(out) == [
        "mediaType",
        "digest",
        "size",
        "urls",
        "annotations",
        "data",
        "platform",
        "artifactType",
        "custom",
    ]
    assert out["platform"] == {
        "architecture": "amd64",
        "os": "windows",
        "os.version": "10.0.17763",
        "features": ["x"],
    }
    assert Descriptor.from_json(out) == descriptor


def test_descriptor_is_read_only_and_hashable() -> None:
    annotations = {"k": "v"}
    descriptor = Descriptor(OCI_MANIFEST, D1, 3, annotations=annotations)
    annotations["k"] = "changed"
    assert descriptor.annotations == {"k": "v"}
    with pytest.raises(TypeError):
        descriptor.annotations["k"] = "x"  # type: ignore[index]
    assert hash(descriptor) == hash(Descriptor(OCI_MANIFEST, D1, 3, annotations={"k": "v"}))
    assert descriptor.to_json()["annotations"] == {"k": "v"}


def test_descriptor_of_bytes() -> None:
    assert Descriptor.of_bytes(OCI_CONFIG, b"{}") == Descriptor(OCI_CONFIG, Digest.of(b"{}"), 2)


@pytest.mark.parametrize(
    "raw",
    [
        [],
        {"digest": str(D1), "size": 1},
        {"mediaType": OCI_CONFIG, "digest": "sha256:short", "size": 1},
        {"mediaType": OCI_CONFIG, "digest": str(D1), "size": -1},
        {"mediaType": OCI_CONFIG, "digest": str(D1), "size": True},
        {"mediaType": OCI_CONFIG, "digest": str(D1), "size": "1"},
        {"mediaType": OCI_CONFIG, "digest": str(D1), "size": 1, "annotations": {"a": 1}},
        {"mediaType": OCI_CONFIG, "digest": str(D1), "size": 1, "platform": {"os": "linux"}},
    ],
)
def test_malformed_descriptors(raw: object) -> None:
    with pytest.raises(ManifestError):
        Descriptor.from_json(raw)


# --- manifests ---------------------------------------------------------------------------------


def test_manifest_round_trip_keeps_subject_and_artifact_type() -> None:
    subject = _descriptor_json(OCI_MANIFEST, D3, 7)
    raw = _manifest_json(
        artifactType="application/vnd.example+type",
        subject=subject,
        annotations={"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    )
    manifest = Manifest.parse(_json(raw), OCI_MANIFEST)
    assert manifest.layers[0].digest == D2
    assert manifest.artifact_type == "application/vnd.example+type"
    assert manifest.subject == Descriptor.from_json(subject)
    data = manifest.to_bytes()
    assert list(json.loads(data)) == [
        "schemaVersion",
        "mediaType",
        "artifactType",
        "config",
        "layers",
        "subject",
        "annotations",
    ]
    assert Manifest.parse(data, None) == manifest


def test_manifest_output_is_canonical() -> None:
    manifest = Manifest.parse(_json(_manifest_json()), None)
    assert manifest.to_bytes() == canonical_json(json.loads(manifest.to_bytes()))
    assert not manifest.to_bytes().endswith(b"\n")


def test_manifest_with_helpers() -> None:
    manifest = Manifest.parse(_json(_manifest_json()), None)
    layer = Descriptor(OCI_LAYER_TAR_ZSTD, D3, 5)
    config = Descriptor(OCI_CONFIG, D3, 2)
    changed = manifest.with_layers([layer]).with_config(config).with_annotations({"a": "b"})
    assert changed.layers == (layer,)
    assert changed.config == config
    assert changed.annotations == {"a": "b"}
    assert manifest.layers[0].digest == D2  # the original is untouched


def test_docker_manifest() -> None:
    raw = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_V2,
        "config": _descriptor_json(DOCKER_CONFIG, D1),
        "layers": [
            _descriptor_json(DOCKER_LAYER_TAR_GZIP, D2),
            _descriptor_json(DOCKER_FOREIGN_LAYER_TAR_GZIP, D3, urls=["https://x/y"]),
        ],
    }
    document = parse_manifest_or_index(_json(raw), DOCKER_MANIFEST_V2)
    assert isinstance(document, Manifest)
    assert document.media_type == DOCKER_MANIFEST_V2
    assert [layer_compression(layer.media_type) for layer in document.layers] == ["gzip", "gzip"]
    assert document.layers[1].extra["urls"] == ["https://x/y"]


@pytest.mark.parametrize("schema_version", [1, 3, None, True])
def test_manifest_needs_schema_version_2(schema_version: object) -> None:
    raw = _manifest_json(schemaVersion=schema_version)
    with pytest.raises((ManifestError, UnsupportedMediaTypeError)):
        Manifest.parse(_json(raw), OCI_MANIFEST)


def test_manifest_parse_refuses_an_index() -> None:
    with pytest.raises(ManifestError, match="expected an image manifest"):
        Manifest.parse(_json({"schemaVersion": 2, "manifests": []}), None)


def test_index_parse_refuses_a_manifest() -> None:
    with pytest.raises(ManifestError, match="expected an image index"):
        Index.parse(_json(_manifest_json()), None)


# --- media type detection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "header", "expected"),
    [
        (_manifest_json(OCI_MANIFEST), None, OCI_MANIFEST),
        (_manifest_json(None), None, OCI_MANIFEST),
        (_manifest_json(None), DOCKER_MANIFEST_V2, DOCKER_MANIFEST_V2),
        (_manifest_json(OCI_MANIFEST), f"{OCI_MANIFEST}; charset=utf-8", OCI_MANIFEST),
        (_manifest_json(OCI_MANIFEST), "application/json", OCI_MANIFEST),
        ({"schemaVersion": 2, "manifests": []}, None, OCI_INDEX),
        ({"schemaVersion": 2, "manifests": []}, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_LIST),
    ],
)
def test_media_type_from_header_body_or_shape(
    body: dict[str, object], header: str | None, expected: str
) -> None:
    assert parse_manifest_or_index(_json(body), header).media_type == expected


def test_header_and_body_must_agree() -> None:
    with pytest.raises(ManifestError, match="served as"):
        parse_manifest_or_index(_json(_manifest_json(OCI_MANIFEST)), DOCKER_MANIFEST_V2)


@pytest.mark.parametrize(
    ("body", "header"),
    [
        ({"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []}, None),
        ({"schemaVersion": 1, "fsLayers": []}, DOCKER_SCHEMA1_SIGNED_MANIFEST),
        (_manifest_json("application/vnd.example.unknown+json"), None),
        (_manifest_json(None), "application/vnd.example.unknown+json"),
    ],
)
def test_unsupported_media_types(body: dict[str, object], header: str | None) -> None:
    with pytest.raises(UnsupportedMediaTypeError):
        parse_manifest_or_index(_json(body), header)


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"[]", b'"manifest"', b"\xff\xfe{", b'{"schemaVersion":2}', b'{"a":1,"a":2}'],
)
def test_malformed_documents(data: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_manifest_or_index(data, None)


# --- indexes and platform selection ------------------------------------------------------------

BUILDX_INDEX = {
    "schemaVersion": 2,
    "mediaType": OCI_INDEX,
    "manifests": [
        _entry(D1, {"architecture": "amd64", "os": "linux"}),
        _entry(D2, {"architecture": "arm64", "os": "linux", "variant": "v8"}),
        _entry(
            D3,
            {"architecture": "unknown", "os": "unknown"},
            **{
                "vnd.docker.reference.digest": str(D1),
                "vnd.docker.reference.type": "attestation-manifest",
            },
        ),
    ],
    "annotations": {"org.opencontainers.image.created": "2024-05-01T00:00:00Z"},
}


def test_select_exact_and_normalised_platforms() -> None:
    index = Index.parse(_json(BUILDX_INDEX), None)
    assert index.select(Platform("linux", "amd64")).digest == D1
    assert index.select(Platform("linux", "arm64")).digest == D2  # no variant means v8
    assert index.select(Platform.parse("linux/arm64/v8")).digest == D2


def test_select_prefers_an_exact_match() -> None:
    raw = {
        "schemaVersion": 2,
        "manifests": [
            _entry(D1, {"architecture": "arm64", "os": "linux"}),
            _entry(D2, {"architecture": "arm64", "os": "linux", "variant": "v8"}),
        ],
    }
    index = Index.parse(_json(raw), None)
    assert index.select(Platform("linux", "arm64", "v8")).digest == D2
    assert index.select(Platform("linux", "arm64")).digest == D1


def test_select_never_picks_attestations() -> None:
    index = Index.parse(_json(BUILDX_INDEX), None)
    assert [d.digest for d in index.platform_manifests()] == [D1, D2]
    with pytest.raises(ManifestError) as caught:
        index.select(Platform("unknown", "unknown"))
    assert "linux/amd64, linux/arm64/v8" in str(caught.value)
    assert "unknown/unknown" not in str(caught.value).split("available")[1]


def test_select_without_match_names_available_platforms() -> None:
    index = Index.parse(_json(BUILDX_INDEX), None)
    with pytest.raises(ManifestError, match=r"linux/s390x .*linux/amd64, linux/arm64/v8"):
        index.select(Platform("linux", "s390x"))


def test_attestation_annotation_alone_is_enough() -> None:
    raw = {
        "schemaVersion": 2,
        "manifests": [
            _entry(
                D1,
                {"architecture": "amd64", "os": "linux"},
                **{"vnd.docker.reference.type": "attestation-manifest"},
            ),
            _descriptor_json(OCI_MANIFEST, D2),  # no platform: not a platform entry
        ],
    }
    index = Index.parse(_json(raw), None)
    assert index.platform_manifests() == []
    with pytest.raises(ManifestError, match="available: none"):
        index.select(Platform("linux", "amd64"))


def test_docker_manifest_list() -> None:
    raw = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_LIST,
        "manifests": [
            {
                "mediaType": DOCKER_MANIFEST_V2,
                "size": 7143,
                "digest": str(D1),
                "platform": {"architecture": "ppc64le", "os": "linux"},
            },
            {
                "mediaType": DOCKER_MANIFEST_V2,
                "size": 7682,
                "digest": str(D2),
                "platform": {
                    "architecture": "arm",
                    "os": "linux",
                    "variant": "v7",
                    "features": ["sse4"],
                },
            },
        ],
    }
    document = parse_manifest_or_index(_json(raw), DOCKER_MANIFEST_LIST)
    assert isinstance(document, Index)
    assert document.select(Platform.parse("linux/arm")).digest == D2
    assert Index.parse(document.to_bytes(), None) == document
    entry = json.loads(document.to_bytes())["manifests"][1]
    assert entry["platform"] == {
        "architecture": "arm",
        "os": "linux",
        "variant": "v7",
        "features": ["sse4"],
    }


# --- image config ------------------------------------------------------------------------------

CONFIG = {
    "created": "2024-01-01T00:00:00Z",
    "architecture": "amd64",
    "os": "linux",
    "config": {"Env": ["PATH=/bin"]},
    "rootfs": {"type": "layers", "diff_ids": [str(D1), str(D2)]},
    "history": [{"created_by": "a"}, {"created_by": "b"}],
    "x-custom": {"kept": [1, 2]},
}


def test_config_diff_ids_round_trip_keeps_everything_else() -> None:
    config = ImageConfig.parse(_json(CONFIG))
    assert config.diff_ids == (D1, D2)
    assert config.platform == Platform("linux", "amd64")
    changed = config.with_diff_ids([D3])
    assert changed.diff_ids == (D3,)
    out = json.loads(changed.to_bytes())
    assert list(out) == list(CONFIG)
    assert out == {**CONFIG, "rootfs": {"type": "layers", "diff_ids": [str(D3)]}}
    assert config.diff_ids == (D1, D2)


def test_config_without_rootfs() -> None:
    config = ImageConfig.parse(b'{"architecture":"amd64","os":"linux"}')
    with pytest.raises(ManifestError):
        _ = config.diff_ids
    assert config.with_diff_ids([D1]).diff_ids == (D1,)


@pytest.mark.parametrize(
    "rootfs", [{"type": "layers"}, {"diff_ids": [1]}, {"diff_ids": ["sha256:x"]}, []]
)
def test_config_with_bad_diff_ids(rootfs: object) -> None:
    with pytest.raises(ManifestError):
        _ = ImageConfig.parse(_json({**CONFIG, "rootfs": rootfs})).diff_ids


# --- property tests ----------------------------------------------------------------------------

_texts = st.text(min_size=1, max_size=12)
_digests = st.binary(max_size=8).map(Digest.of)
_platforms = st.builds(
    Platform,
    os=st.sampled_from(["linux", "windows", "unknown"]),
    architecture=st.sampled_from(["amd64", "arm64", "arm", "unknown"]),
    variant=st.none() | st.sampled_from(["v7", "v8"]),
)
_extras = st.dictionaries(
    st.sampled_from(["urls", "artifactType", "data", "x-other"]),
    st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=2),
    max_size=3,
)
_descriptors = st.builds(
    Descriptor,
    media_type=st.sampled_from(
        [OCI_MANIFEST, OCI_LAYER_TAR_GZIP, DOCKER_LAYER_TAR_GZIP, OCI_CONFIG]
    ),
    digest=_digests,
    size=st.integers(min_value=0, max_value=2**53),
    annotations=st.dictionaries(_texts, st.text(max_size=10), max_size=3),
    platform=st.none() | _platforms,
    extra=_extras,
)
_manifests = st.builds(
    Manifest,
    media_type=st.sampled_from([OCI_MANIFEST, DOCKER_MANIFEST_V2]),
    # A config within LimitsConfig.max_config_bytes (16 MiB).
    config=_descriptors.map(lambda d: dataclasses.replace(d, size=d.size % (16 << 20))),
    layers=st.lists(_descriptors, max_size=4).map(tuple),
    annotations=st.dictionaries(_texts, st.text(max_size=10), max_size=3),
    extra=st.dictionaries(
        st.sampled_from(["artifactType", "x-field"]), st.text(max_size=5), max_size=2
    ),
)
_indexes = st.builds(
    Index,
    media_type=st.sampled_from([OCI_INDEX, DOCKER_MANIFEST_LIST]),
    manifests=st.lists(_descriptors, max_size=4).map(tuple),
    annotations=st.dictionaries(_texts, st.text(max_size=10), max_size=3),
)


@given(_descriptors)
def test_descriptor_json_round_trip(descriptor: Descriptor) -> None:
    assert Descriptor.from_json(json.loads(canonical_json(descriptor.to_json()))) == descriptor


@given(_manifests)
def test_manifest_round_trip(manifest: Manifest) -> None:
    data = manifest.to_bytes()
    parsed = parse_manifest_or_index(data, None)
    assert parsed == manifest
    assert parsed.to_bytes() == data


@given(_indexes)
def test_index_round_trip(index: Index) -> None:
    data = index.to_bytes()
    parsed = parse_manifest_or_index(data, index.media_type)
    assert parsed == index
    assert parsed.to_bytes() == data


@given(_indexes, _platforms)
def test_select_returns_a_matching_real_platform_or_raises(index: Index, wanted: Platform) -> None:
    try:
        chosen = index.select(wanted)
    except ManifestError:
        assert not any(
            d.platform is not None and wanted.matches(d.platform)
            for d in index.platform_manifests()
        )
    else:
        assert chosen in index.platform_manifests()
        assert chosen.platform is not None and wanted.matches(chosen.platform)
        assert not chosen.is_attestation()
