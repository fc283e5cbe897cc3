"""Hostile manifests, indexes and configs (issue 12; docs/reliability.md).

Hypothesis mutates REAL documents: the manifest, config and an index of an image that
lazyfs's image builder wrote, with a zstd:chunked layer whose TOC annotations lazyfs's writer
made. Any node of the JSON may be replaced by an out-of-range, negative or huge integer, a value
of the wrong type, NaN, a deeply nested value, or removed; lists may grow past the limits; keys
may be duplicated.

The contract, for every case: parsing either raises a LazyfsError whose message is one line, or
gives a model whose every field is in range (checked here independently of the parser), that
writes back to bytes which parse to the same model. The zstd:chunked position annotations of
each layer are then parsed against the layer's size with the same contract.

``LAZYFS_FUZZ_FIGURES=path`` writes the outcome counts (docs/reliability.md quotes them).
"""

from __future__ import annotations

import copy
import functools
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzzing import FUZZ, OUTCOMES, write_figures
from hypothesis import given
from hypothesis import strategies as st
from imagebuild import KIB, random_bytes

from lazyfs.config import ChunkingConfig, LimitsConfig
from lazyfs.convert.imagebuild import directory, layer_tar_bytes, regular_file, write_image
from lazyfs.errors import LazyfsError, ManifestError
from lazyfs.formats.chunked.toc import (
    TOC_POSITION_ANNOTATION,
    parse_toc_position,
)
from lazyfs.formats.chunked.writer import write_chunked_layer
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import (
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_LAYER_TAR_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    parse_manifest_or_index,
)
from lazyfs.model.platform import Platform

LIMITS = LimitsConfig()
MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Iterator[None]:
    yield
    write_figures()


# --- the real documents the mutations start from -----------------------------------------------


@functools.cache
def documents() -> dict[str, dict[str, Any]]:
    """A manifest (a gzip layer and a zstd:chunked one), its config, and an index."""
    with tempfile.TemporaryDirectory() as work:
        image = write_image(
            Path(work) / "layout",
            "v1",
            [[directory("etc"), regular_file("etc/hosts", b"127.0.0.1 localhost\n")]],
        )
        tar_path, blob_path = Path(work) / "layer.tar", Path(work) / "layer.zst"
        tar_path.write_bytes(layer_tar_bytes([regular_file("bin/x", random_bytes(8 * KIB, 1))]))
        chunked = write_chunked_layer(tar_path, blob_path, ChunkingConfig())
    layer = Descriptor(OCI_LAYER_TAR_ZSTD, chunked.digest, chunked.size, chunked.annotations)
    manifest = image.manifest.with_layers([*image.manifest.layers, layer])
    entry = image.manifest_descriptor
    index = Index(
        OCI_INDEX,
        (
            Descriptor(entry.media_type, entry.digest, entry.size, platform=Platform.host()),
            Descriptor(OCI_MANIFEST, entry.digest, entry.size, platform=Platform("linux", "s390x")),
            Descriptor(
                OCI_MANIFEST,
                entry.digest,
                entry.size,
                {"vnd.docker.reference.type": "attestation-manifest"},
                Platform("unknown", "unknown"),
            ),
        ),
    )
    return {
        "manifest": manifest.to_json(),
        "index": index.to_json(),
        "config": copy.deepcopy(dict(image.config.fields)),
    }


def test_the_documents_parse_as_they_are() -> None:
    docs = documents()
    manifest = parse_manifest_or_index(json.dumps(docs["manifest"]).encode(), OCI_MANIFEST)
    assert isinstance(manifest, Manifest) and len(manifest.layers) == 2
    index = parse_manifest_or_index(json.dumps(docs["index"]).encode(), None)
    assert isinstance(index, Index) and index.select(Platform.host())
    assert ImageConfig.parse(json.dumps(docs["config"]).encode()).diff_ids
    for layer in manifest.layers:
        if TOC_POSITION_ANNOTATION in layer.annotations:
            parse_toc_position(layer.annotations[TOC_POSITION_ANNOTATION], blob_size=layer.size)


# --- hostile values and mutations --------------------------------------------------------------

HOSTILE = [
    -1, -(2**63), 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, 10**400, 16 << 20,
    (16 << 20) + 1, 0, 2, 1.0, 2.0, 1e300, float("nan"), float("inf"), True, False, None, "",
    "2", "sha256:" + "a" * 64, "sha256:" + "A" * 64, "sha256:abc", "md5:" + "a" * 32,
    "sha512:" + "b" * 128, "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.layer.v1.tar+zstd",
    "text/html; charset=utf-8", "not a type", "a/b\nc", "x" * 300, [], {}, [1], {"a": 1},
    {"os": "linux", "architecture": "amd64"}, {"os": 5}, ["sha256:" + "c" * 64],
    "1:2:3:1", "0:99999999:3:1", "-1:2:3:1", "1:2:3", "9223372036854775808:1:1:1",
]  # fmt: skip

Mutation = Callable[[Any], Any]


def _nodes(document: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path (keys and indexes) into ``document``."""
    yield path
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _nodes(value, (*path, key))
    elif isinstance(document, list):
        for position, value in enumerate(document):
            yield from _nodes(value, (*path, position))


def _replace(document: Any, path: tuple[Any, ...], change: Callable[[Any], Any]) -> Any:
    if not path:
        return change(document)
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = change(parent[path[-1]])
    return document


def _delete(document: Any, path: tuple[Any, ...]) -> Any:
    if not path:
        return document
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    del parent[path[-1]]
    return document


def _nested(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def mutations(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "nest", "grow", "rename"]))
    pick, value = draw(st.integers(0, 10_000)), draw(st.sampled_from(HOSTILE) | st.text(max_size=9))
    depth = draw(st.sampled_from([10, 70, 300]))  # deeper ones are written as text (below)
    times = draw(st.sampled_from([2, 50, 600]))

    def mutate(document: Any) -> Any:
        paths = list(_nodes(document))
        path = paths[pick % len(paths)]
        if kind == "set":
            return _replace(document, path, lambda _old: copy.deepcopy(value))
        if kind == "delete":
            return _delete(document, path)
        if kind == "nest":
            return _replace(document, path, lambda old: _nested(old, depth))
        if kind == "grow":  # a list element many times over (600 layers, say)
            lists = [p for p in paths if p and isinstance(_at(document, p[:-1]), list)]
            if not lists:
                return document
            chosen = lists[pick % len(lists)]
            parent = _at(document, chosen[:-1])
            parent.extend(copy.deepcopy(parent[chosen[-1]]) for _ in range(times))
            return document
        keys = [p for p in paths if p and isinstance(_at(document, p[:-1]), dict)]
        if keys:  # a key renamed to another document key, so the first one is lost
            chosen = keys[pick % len(keys)]
            parent = _at(document, chosen[:-1])
            parent[str(value)[:20]] = parent.pop(chosen[-1])
        return document

    return mutate


def _at(document: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        document = document[step]
    return document


def mutated(name: str, steps: list[Mutation], textual: str) -> bytes:
    document: Any = copy.deepcopy(documents()[name])
    for step in steps:
        document = step(document)
    data = json.dumps(document).encode()
    if textual == "duplicate key":  # a key twice in one object: parsers disagree on its value
        data = data.replace(b'"size": ', b'"size": 1, "size": ', 1)
    elif textual == "very deep":  # deeper than Python's recursion limit
        data = data.replace(b'"size": ', b'"size": ' + b"[" * 5000 + b"]" * 5000 + b", ", 1)
    return data


TEXTUAL = st.sampled_from(["", "", "duplicate key", "very deep"])


# --- the contract ------------------------------------------------------------------------------


def assert_one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text, repr(text)


def check(suite: str, parse: Callable[[], object], validate: Callable[[Any], None]) -> None:
    try:
        parsed = parse()
    except LazyfsError as exc:
        assert_one_line(exc)
        OUTCOMES[f"{suite}: refused"] += 1
        return
    validate(parsed)
    OUTCOMES[f"{suite}: accepted, all in range"] += 1


def assert_descriptor(descriptor: Descriptor) -> None:
    assert MEDIA_TYPE.fullmatch(descriptor.media_type)
    assert isinstance(descriptor.digest, Digest)
    assert type(descriptor.size) is int and 0 <= descriptor.size < 2**63
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in descriptor.annotations.items())
    if descriptor.platform is not None:
        assert isinstance(descriptor.platform.os, str) and descriptor.platform.os
        assert isinstance(descriptor.platform.architecture, str)


def validate_manifest(parsed: Manifest | Index) -> None:
    if isinstance(parsed, Manifest):
        assert parsed.media_type in IMAGE_MANIFEST_TYPES
        assert parsed.config.size <= LIMITS.max_config_bytes
        assert len(parsed.layers) <= LIMITS.max_image_layers
        for descriptor in (parsed.config, *parsed.layers):
            assert_descriptor(descriptor)
        for layer in parsed.layers:
            position = layer.annotations.get(TOC_POSITION_ANNOTATION)
            if position is not None:
                check_position(position, layer.size)
    else:
        assert parsed.media_type in INDEX_TYPES
        for descriptor in parsed.manifests:
            assert_descriptor(descriptor)
        try:
            parsed.select(Platform.host())
        except ManifestError as exc:
            assert_one_line(exc)
    again = parse_manifest_or_index(parsed.to_bytes(), parsed.media_type)
    assert again == parsed


def check_position(value: str, blob_size: int) -> None:
    try:
        section = parse_toc_position(value, blob_size=blob_size)
    except LazyfsError as exc:
        assert_one_line(exc)
        OUTCOMES["TOC position annotation: refused"] += 1
        return
    assert section.offset >= 0 and 0 < section.length <= LIMITS.max_toc_compressed_bytes
    assert section.end <= blob_size and section.uncompressed_length <= LIMITS.max_toc_bytes
    OUTCOMES["TOC position annotation: accepted, in range"] += 1


def validate_config(config: ImageConfig) -> None:
    for read in (lambda: config.diff_ids, lambda: config.platform, config.to_bytes):
        try:
            value = read()
        except LazyfsError as exc:
            assert_one_line(exc)
            continue
        if isinstance(value, tuple):
            assert all(isinstance(d, Digest) for d in value)
    assert ImageConfig.parse(config.to_bytes()) == config


# --- fuzzing -----------------------------------------------------------------------------------


@FUZZ
@given(st.lists(mutations(), min_size=1, max_size=3), TEXTUAL, st.booleans())
def test_mutated_manifests(steps: list[Mutation], textual: str, typed: bool) -> None:
    data = mutated("manifest", steps, textual)
    media_type = OCI_MANIFEST if typed else None
    check("manifest", lambda: parse_manifest_or_index(data, media_type), validate_manifest)


@FUZZ
@given(st.lists(mutations(), min_size=1, max_size=3), TEXTUAL)
def test_mutated_indexes(steps: list[Mutation], textual: str) -> None:
    data = mutated("index", steps, textual)
    check("index", lambda: parse_manifest_or_index(data, None), validate_manifest)


@FUZZ
@given(st.lists(mutations(), min_size=1, max_size=3), TEXTUAL)
def test_mutated_configs(steps: list[Mutation], textual: str) -> None:
    data = mutated("config", steps, textual)
    check("image config", lambda: ImageConfig.parse(data), validate_config)


@FUZZ
@given(st.binary(max_size=48), st.integers(0, 5000))
def test_garbage_spliced_into_a_manifest(garbage: bytes, at: int) -> None:
    text = json.dumps(documents()["manifest"]).encode()
    data = text[: at % len(text)] + garbage + text[at % len(text) :]
    check("manifest", lambda: parse_manifest_or_index(data, None), validate_manifest)


# --- the limits and the messages ---------------------------------------------------------------


def _manifest_with(**changes: Any) -> bytes:
    document = copy.deepcopy(documents()["manifest"])
    for key, value in changes.items():
        document[key] = value
    return json.dumps(document).encode()


def test_too_many_layers_are_refused() -> None:
    layer = documents()["manifest"]["layers"][0]
    with pytest.raises(ManifestError, match="501 layers, more than the limit of 500"):
        Manifest.parse(_manifest_with(layers=[layer] * 501), OCI_MANIFEST)


def test_a_config_larger_than_the_limit_is_refused() -> None:
    config = {**documents()["manifest"]["config"], "size": (16 << 20) + 1}
    with pytest.raises(ManifestError, match="manifest config: 16777217 bytes, more than"):
        Manifest.parse(_manifest_with(config=config), OCI_MANIFEST)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        (-1, "got -1"),
        (2**63, "got 9223372036854775808"),
        (True, "got True"),
        (1.0, "got 1.0"),
    ],
)
def test_layer_sizes_out_of_range_name_the_layer(size: object, message: str) -> None:
    layers = copy.deepcopy(documents()["manifest"]["layers"])
    layers[1]["size"] = size
    with pytest.raises(ManifestError) as caught:
        Manifest.parse(_manifest_with(layers=layers), OCI_MANIFEST)
    assert str(caught.value).startswith("manifest layers[1]: 'size' must be an integer")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"schemaVersion":2,"x":' + b"[" * 500 + b"]" * 500 + b"}",
        b'{"schemaVersion":2,"size":NaN}',
        b'{"schemaVersion":2,"size":Infinity}',
        b'{"schemaVersion":2,"schemaVersion":2}',
    ],
)
def test_deep_nesting_nan_and_duplicates_are_manifest_errors(data: bytes) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest_or_index(data, OCI_MANIFEST)
    assert_one_line(caught.value)


def test_a_huge_object_in_a_message_is_cut_short() -> None:
    layers = copy.deepcopy(documents()["manifest"]["layers"])
    layers[0]["mediaType"] = ["x" * 10_000]
    with pytest.raises(ManifestError) as caught:
        Manifest.parse(_manifest_with(layers=layers), OCI_MANIFEST)
    assert len(str(caught.value)) < 200
