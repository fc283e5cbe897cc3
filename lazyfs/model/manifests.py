"""The OCI and Docker image model: descriptors, manifests, indexes and image configs.

A pure leaf: it parses and writes bytes, never touches disk or network.

Parsing keeps every field lazyfs does not model verbatim (``urls``, ``data``, ``subject``,
``artifactType``, ``os.version`` ...), so rewriting a manifest loses nothing. Writing uses
:func:`canonical_json`, lazyfs's one JSON form, so the same model always gives the same bytes
(and so the same digest). Keys come out in the order the Go structs of image-spec declare them
(what skopeo and containerd write), unknown keys after them in the order they were read, and
annotation maps sorted by key. Rewriting bytes from another tool may still change them (spacing,
escaping), so keep the original bytes wherever their digest matters.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final, Literal

from lazyfs.config import LimitsConfig
from lazyfs.errors import ManifestError, UnsupportedMediaTypeError
from lazyfs.model.digest import Digest
from lazyfs.model.platform import Platform

# --- media types -------------------------------------------------------------------------------

OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY: Final = "application/vnd.oci.empty.v1+json"
OCI_LAYER_TAR: Final = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR_ZSTD: Final = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST_TAR: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_TAR_GZIP: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_TAR_ZSTD: Final = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST_V2: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR_GZIP: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_TAR_GZIP: Final = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v1+prettyjws"

# The most a manifest or index may be, from a registry or an OCI layout's index.json:
# containerd's limit; a bigger one is an attack or a mistake.
MAX_MANIFEST_BYTES: Final = 4 << 20

INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
IMAGE_MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST_V2})
# In the order an Accept header lists them; distribution 2.8 needs the OCI types listed.
ALL_MANIFEST_TYPES: Final[tuple[str, ...]] = (
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2,
)
_SCHEMA1_TYPES: Final = frozenset({DOCKER_SCHEMA1_MANIFEST, DOCKER_SCHEMA1_SIGNED_MANIFEST})
# Content-Type values that say nothing about the document (static file servers send these).
_GENERIC_TYPES: Final = frozenset({"application/json", "application/octet-stream", "text/plain"})

LayerCompression = Literal["none", "gzip", "zstd"]
_LAYER_COMPRESSION: Final[Mapping[str, LayerCompression]] = MappingProxyType(
    {
        OCI_LAYER_TAR: "none",
        OCI_LAYER_NONDIST_TAR: "none",
        OCI_LAYER_TAR_GZIP: "gzip",
        OCI_LAYER_NONDIST_TAR_GZIP: "gzip",
        DOCKER_LAYER_TAR_GZIP: "gzip",
        DOCKER_FOREIGN_LAYER_TAR_GZIP: "gzip",
        OCI_LAYER_TAR_ZSTD: "zstd",
        OCI_LAYER_NONDIST_TAR_ZSTD: "zstd",
    }
)

# --- annotations -------------------------------------------------------------------------------

REF_NAME_ANNOTATION: Final = "org.opencontainers.image.ref.name"
# Docker buildx stores provenance/SBOM manifests in the index under an unknown/unknown platform.
DOCKER_REFERENCE_TYPE_ANNOTATION: Final = "vnd.docker.reference.type"
ATTESTATION_REFERENCE_TYPE: Final = "attestation-manifest"

# Output key orders: the field order of image-spec's Go structs.
_DESCRIPTOR_KEYS: Final = (
    "mediaType",
    "digest",
    "size",
    "urls",
    "annotations",
    "data",
    "platform",
    "artifactType",
)
_PLATFORM_KEYS: Final = ("architecture", "os", "os.version", "os.features", "variant", "features")
_MANIFEST_KEYS: Final = (
    "schemaVersion",
    "mediaType",
    "artifactType",
    "config",
    "layers",
    "subject",
    "annotations",
)
_INDEX_KEYS: Final = (
    "schemaVersion",
    "mediaType",
    "artifactType",
    "manifests",
    "subject",
    "annotations",
)

JsonObject = Mapping[str, object]
_SCHEMA_VERSION: Final = 2  # of both manifests and indexes; fixed for Docker compatibility
_MAX_SIZE: Final = 2**63 - 1  # image-spec: int64
# image-spec's mediaType pattern (RFC 6838 names: type "/" subtype, 127 characters each).
_MEDIA_TYPE_RE: Final = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)
# Deeper JSON than this is refused: real documents nest about six levels, and copying a deep
# one (``copy.deepcopy``) would exhaust Python's recursion limit.
MAX_JSON_DEPTH: Final = 64
_SHOWN_CHARS: Final = 80
_DEFAULT_LIMITS: Final = LimitsConfig()


# --- canonical JSON ----------------------------------------------------------------------------


def canonical_json(obj: object) -> bytes:
    """Serialise ``obj`` the one way lazyfs writes JSON.

    Compact separators (no spaces), keys in insertion order (never re-sorted: callers put them in
    the order they want), UTF-8 without ``\\u`` escapes for non-ASCII text, and no trailing
    newline. NaN and infinities are refused. Equal inputs therefore give identical bytes, which
    keeps digests of everything lazyfs writes reproducible.
    """
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"cannot serialise to JSON: {exc}") from exc
    return text.encode("utf-8")


def load_json_object(data: bytes, what: str) -> dict[str, object]:
    """Parse ``data`` as one JSON object; duplicate keys, NaN and Infinity (which Go refuses)
    and nesting deeper than ``MAX_JSON_DEPTH`` are refused."""
    try:
        value = json.loads(
            data, object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ManifestError(f"{what}: malformed JSON: {_one_line(str(exc))}") from exc
    if not isinstance(value, dict):
        raise ManifestError(f"{what}: expected a JSON object, got {type(value).__name__}")
    if _depth_exceeds(value, MAX_JSON_DEPTH):
        raise ManifestError(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        # Different parsers keep different duplicates, so such a document means two things.
        raise ValueError("duplicate key in JSON object")
    return result


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _depth_exceeds(value: object, limit: int) -> bool:
    """True if containers nest more than ``limit`` deep (iterative: no recursion to exhaust)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = (
            node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        )
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _shown(value: object) -> str:
    """``value`` for a one-line message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _ordered(fields: Mapping[str, object], key_order: Sequence[str]) -> dict[str, object]:
    """``fields`` with known keys first in ``key_order``, the rest after in their own order."""
    known = {key: fields[key] for key in key_order if key in fields}
    rest = {key: value for key, value in fields.items() if key not in known}
    return known | rest


# --- field readers -----------------------------------------------------------------------------


def _as_object(value: object, what: str) -> JsonObject:
    if not isinstance(value, dict):
        raise ManifestError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def _required_str(obj: JsonObject, key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{what}: {key!r} must be a non-empty string, got {_shown(value)}")
    return value


def _optional_str(obj: JsonObject, key: str, what: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ManifestError(f"{what}: {key!r} must be a string, got {_shown(value)}")
    return value


def _required_media_type(obj: JsonObject, what: str) -> str:
    value = _required_str(obj, "mediaType", what)
    if not _MEDIA_TYPE_RE.fullmatch(value):
        raise ManifestError(f"{what}: 'mediaType' {_shown(value)} is not a media type")
    return value


def _required_size(obj: JsonObject, what: str) -> int:
    value = obj.get("size")
    # bool is an int in Python, but never a size in JSON.
    if type(value) is not int or not 0 <= value <= _MAX_SIZE:
        raise ManifestError(
            f"{what}: 'size' must be an integer in 0..{_MAX_SIZE}, got {_shown(value)}"
        )
    return value


def _required_list(obj: JsonObject, key: str, what: str) -> list[object]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise ManifestError(f"{what}: {key!r} must be a list, got {_shown(value)}")
    return value


def _annotations(obj: JsonObject, what: str) -> dict[str, str]:
    value = obj.get("annotations")
    if value is None:
        return {}
    mapping = _as_object(value, f"{what} annotations")
    if not all(isinstance(v, str) for v in mapping.values()):
        raise ManifestError(f"{what}: annotation values must be strings")
    return {key: str(v) for key, v in mapping.items()}


def _check_schema_version(obj: JsonObject, what: str) -> None:
    version = obj.get("schemaVersion")
    if type(version) is not int or version != _SCHEMA_VERSION:
        raise ManifestError(f"{what}: schemaVersion must be 2, got {_shown(version)}")


def _frozen_annotations(annotations: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted(annotations.items())))


def _frozen_extra(extra: Mapping[str, object]) -> Mapping[str, object]:
    return MappingProxyType(copy.deepcopy(dict(extra)))


def _extra_fields(obj: JsonObject, modelled: Iterable[str]) -> dict[str, object]:
    skip = set(modelled)
    return {key: value for key, value in obj.items() if key not in skip}


# --- descriptors -------------------------------------------------------------------------------

_DESCRIPTOR_MODELLED: Final = ("mediaType", "digest", "size", "annotations", "platform")
_PLATFORM_MODELLED: Final = ("os", "architecture", "variant")


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a blob is, its digest and size.

    ``platform_extra`` holds the platform object's other fields (``os.version``, ``os.features``,
    ``features``) and ``extra`` the descriptor's other fields (``urls``, ``data``,
    ``artifactType``), both verbatim. Equal descriptors hash alike; the hash uses only the
    identifying fields because the mappings are not hashable.
    """

    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    platform_extra: Mapping[str, object] = field(default_factory=dict)
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "annotations", _frozen_annotations(self.annotations))
        object.__setattr__(self, "platform_extra", _frozen_extra(self.platform_extra))
        object.__setattr__(self, "extra", _frozen_extra(self.extra))

    def __hash__(self) -> int:
        return hash((self.media_type, self.digest, self.size, self.platform))

    @classmethod
    def of_bytes(cls, media_type: str, data: bytes) -> Descriptor:
        """The descriptor of ``data`` (SHA-256)."""
        return cls(media_type, Digest.of(data), len(data))

    @classmethod
    def from_json(cls, obj: object, what: str = "descriptor") -> Descriptor:
        """Read a descriptor object; ManifestError, naming ``what``, if it is malformed."""
        fields = _as_object(obj, what)
        platform_obj = fields.get("platform")
        platform_fields = (
            None if platform_obj is None else _as_object(platform_obj, f"{what} platform")
        )
        return cls(
            media_type=_required_media_type(fields, what),
            digest=_digest(_required_str(fields, "digest", what), what),
            size=_required_size(fields, what),
            annotations=_annotations(fields, what),
            platform=None if platform_fields is None else Platform.from_json(platform_fields),
            platform_extra=_extra_fields(platform_fields or {}, _PLATFORM_MODELLED),
            extra=_extra_fields(fields, _DESCRIPTOR_MODELLED),
        )

    def to_json(self) -> dict[str, object]:
        """The descriptor as a JSON object (fresh containers, safe to modify)."""
        fields: dict[str, object] = {
            **copy.deepcopy(dict(self.extra)),  # first, so the modelled fields win
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.annotations:
            fields["annotations"] = dict(self.annotations)
        if self.platform is not None:
            fields["platform"] = self._platform_json(self.platform)
        return _ordered(fields, _DESCRIPTOR_KEYS)

    def _platform_json(self, platform: Platform) -> dict[str, object]:
        fields: dict[str, object] = {
            **copy.deepcopy(dict(self.platform_extra)),
            "architecture": platform.architecture,
            "os": platform.os,
        }
        if platform.variant is not None:
            fields["variant"] = platform.variant
        return _ordered(fields, _PLATFORM_KEYS)

    def with_annotations(self, annotations: Mapping[str, str]) -> Descriptor:
        """A copy whose annotations are exactly ``annotations``."""
        return replace(self, annotations=annotations)

    @property
    def ref_name(self) -> str | None:
        """The ``org.opencontainers.image.ref.name`` annotation (a tag in an image layout)."""
        return self.annotations.get(REF_NAME_ANNOTATION)

    def is_attestation(self) -> bool:
        """True for buildx provenance/SBOM entries and ``unknown/unknown`` placeholders."""
        if self.annotations.get(DOCKER_REFERENCE_TYPE_ANNOTATION) == ATTESTATION_REFERENCE_TYPE:
            return True
        platform = self.platform
        return platform is not None and platform.os == platform.architecture == "unknown"


def _descriptor_list(obj: JsonObject, key: str, what: str) -> tuple[Descriptor, ...]:
    items = _required_list(obj, key, what)
    return tuple(Descriptor.from_json(item, f"{what} {key}[{i}]") for i, item in enumerate(items))


def _digest(text: str, what: str) -> Digest:
    try:
        return Digest.parse(text)
    except ManifestError:
        raise ManifestError(f"{what}: invalid digest {_shown(text)}") from None


# --- media type detection ----------------------------------------------------------------------


def _strip_parameters(media_type: str) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    return media_type.split(";", 1)[0].strip().lower()


def _media_type_by_shape(obj: JsonObject) -> str | None:
    if obj.get("schemaVersion") == 1 or "fsLayers" in obj:
        return DOCKER_SCHEMA1_MANIFEST
    if "manifests" in obj:
        return OCI_INDEX
    if "config" in obj and "layers" in obj:
        return OCI_MANIFEST
    return None


def _resolve_media_type(obj: JsonObject, header_type: str | None, what: str) -> str:
    """The document's media type: the header's, else the body's, else guessed from its shape."""
    header = None if header_type is None else _strip_parameters(header_type)
    if header in _GENERIC_TYPES or header == "":
        header = None
    body = _optional_str(obj, "mediaType", what)
    if header is not None and body is not None and header != body:
        raise ManifestError(f"{what}: served as {header} but its mediaType says {body}")
    media_type = header or body or _media_type_by_shape(obj)
    if media_type is None:
        raise ManifestError(f"{what}: neither a manifest nor an index (no mediaType)")
    if media_type in _SCHEMA1_TYPES:
        raise UnsupportedMediaTypeError(f"{what}: Docker schema 1 manifests are not supported")
    if media_type not in INDEX_TYPES | IMAGE_MANIFEST_TYPES:
        raise UnsupportedMediaTypeError(f"{what}: unsupported media type {media_type}")
    return media_type


def _document(data: bytes, media_type: str | None, what: str) -> tuple[dict[str, object], str]:
    obj = load_json_object(data, what)
    return obj, _resolve_media_type(obj, media_type, what)


def parse_manifest_or_index(
    data: bytes, media_type: str | None, limits: LimitsConfig = _DEFAULT_LIMITS
) -> Manifest | Index:
    """Parse a manifest or index; ``media_type`` is the Content-Type it came with, if any."""
    obj, resolved = _document(data, media_type, "manifest")
    if resolved in INDEX_TYPES:
        return Index.from_json(obj, resolved)
    return Manifest.from_json(obj, resolved, limits)


def layer_compression(media_type: str) -> LayerCompression:
    """How a layer of this media type is compressed."""
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise UnsupportedMediaTypeError(f"unsupported layer media type {media_type}") from None


# --- manifests ---------------------------------------------------------------------------------

_MANIFEST_MODELLED: Final = ("schemaVersion", "mediaType", "config", "layers", "annotations")


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker schema 2).

    ``extra`` keeps the other top-level fields verbatim (``artifactType``, ``subject``, ...).
    ``schemaVersion`` must be 2 and is always written as 2, so it is not kept.
    """

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "annotations", _frozen_annotations(self.annotations))
        object.__setattr__(self, "extra", _frozen_extra(self.extra))

    def __hash__(self) -> int:
        return hash((self.media_type, self.config, self.layers))

    @classmethod
    def parse(
        cls, data: bytes, media_type: str | None, limits: LimitsConfig = _DEFAULT_LIMITS
    ) -> Manifest:
        """Parse an image manifest; an index here is a ManifestError."""
        obj, resolved = _document(data, media_type, "manifest")
        if resolved not in IMAGE_MANIFEST_TYPES:
            raise ManifestError(f"expected an image manifest, got {resolved}")
        return cls.from_json(obj, resolved, limits)

    @classmethod
    def from_json(
        cls, obj: JsonObject, media_type: str, limits: LimitsConfig = _DEFAULT_LIMITS
    ) -> Manifest:
        """Build from an already-decoded object whose media type is known; its layer count
        and config size must be within ``limits``."""
        what = "manifest"
        _check_schema_version(obj, what)
        raw_config = obj.get("config")
        if raw_config is None:
            raise ManifestError(f"{what}: no 'config'")
        config = Descriptor.from_json(raw_config, f"{what} config")
        if config.size > limits.max_config_bytes:
            raise ManifestError(
                f"{what} config: {config.size} bytes, more than the limit of "
                f"{limits.max_config_bytes}"
            )
        layers = _descriptor_list(obj, "layers", what)
        if len(layers) > limits.max_image_layers:
            raise ManifestError(
                f"{what}: {len(layers)} layers, more than the limit of {limits.max_image_layers}"
            )
        return cls(
            media_type=media_type,
            config=config,
            layers=layers,
            annotations=_annotations(obj, what),
            extra=_extra_fields(obj, _MANIFEST_MODELLED),
        )

    def to_json(self) -> dict[str, object]:
        fields: dict[str, object] = {
            **copy.deepcopy(dict(self.extra)),
            "schemaVersion": _SCHEMA_VERSION,
            "mediaType": self.media_type,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }
        if self.annotations:
            fields["annotations"] = dict(self.annotations)
        return _ordered(fields, _MANIFEST_KEYS)

    def to_bytes(self) -> bytes:
        """The manifest in :func:`canonical_json` form."""
        return canonical_json(self.to_json())

    def with_layers(self, layers: Iterable[Descriptor]) -> Manifest:
        return replace(self, layers=tuple(layers))

    def with_config(self, config: Descriptor) -> Manifest:
        return replace(self, config=config)

    def with_annotations(self, annotations: Mapping[str, str]) -> Manifest:
        """A copy whose annotations are exactly ``annotations``."""
        return replace(self, annotations=annotations)

    @property
    def artifact_type(self) -> str | None:
        return _optional_str(self.extra, "artifactType", "manifest")

    @property
    def subject(self) -> Descriptor | None:
        value = self.extra.get("subject")
        return None if value is None else Descriptor.from_json(value)


# --- indexes -----------------------------------------------------------------------------------

_INDEX_MODELLED: Final = ("schemaVersion", "mediaType", "manifests", "annotations")


@dataclass(frozen=True)
class Index:
    """An image index (OCI) or manifest list (Docker); ``extra`` as for :class:`Manifest`."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "manifests", tuple(self.manifests))
        object.__setattr__(self, "annotations", _frozen_annotations(self.annotations))
        object.__setattr__(self, "extra", _frozen_extra(self.extra))

    def __hash__(self) -> int:
        return hash((self.media_type, self.manifests))

    @classmethod
    def parse(cls, data: bytes, media_type: str | None) -> Index:
        """Parse an index; a manifest here is a ManifestError."""
        obj, resolved = _document(data, media_type, "index")
        if resolved not in INDEX_TYPES:
            raise ManifestError(f"expected an image index, got {resolved}")
        return cls.from_json(obj, resolved)

    @classmethod
    def from_json(cls, obj: JsonObject, media_type: str) -> Index:
        """Build from an already-decoded object whose media type is known."""
        _check_schema_version(obj, "index")
        return cls(
            media_type=media_type,
            manifests=_descriptor_list(obj, "manifests", "index"),
            annotations=_annotations(obj, "index"),
            extra=_extra_fields(obj, _INDEX_MODELLED),
        )

    def to_json(self) -> dict[str, object]:
        fields: dict[str, object] = {
            **copy.deepcopy(dict(self.extra)),
            "schemaVersion": _SCHEMA_VERSION,
            "mediaType": self.media_type,
            "manifests": [entry.to_json() for entry in self.manifests],
        }
        if self.annotations:
            fields["annotations"] = dict(self.annotations)
        return _ordered(fields, _INDEX_KEYS)

    def to_bytes(self) -> bytes:
        """The index in :func:`canonical_json` form."""
        return canonical_json(self.to_json())

    def with_manifests(self, manifests: Iterable[Descriptor]) -> Index:
        return replace(self, manifests=tuple(manifests))

    def platform_manifests(self) -> list[Descriptor]:
        """Entries for a real platform: no attestations, no entries without a platform."""
        return [d for d in self.manifests if d.platform is not None and not d.is_attestation()]

    def select(self, platform: Platform) -> Descriptor:
        """The entry for ``platform``: an exact match first, else the first compatible one."""
        candidates = self.platform_manifests()
        for candidate in candidates:
            if candidate.platform == platform:
                return candidate
        for candidate in candidates:
            if candidate.platform is not None and platform.matches(candidate.platform):
                return candidate
        available = ", ".join(str(c.platform) for c in candidates) or "none"
        raise ManifestError(f"no manifest for platform {platform} (available: {available})")


# --- image config ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """An image configuration blob, kept whole so rewriting it keeps every field and key order."""

    fields: Mapping[str, object]

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", _frozen_extra(self.fields))

    @classmethod
    def parse(cls, data: bytes) -> ImageConfig:
        return cls(load_json_object(data, "image config"))

    def to_bytes(self) -> bytes:
        """The config in :func:`canonical_json` form."""
        return canonical_json(copy.deepcopy(dict(self.fields)))

    @property
    def diff_ids(self) -> tuple[Digest, ...]:
        """``rootfs.diff_ids``: the digests of the uncompressed layer tars, in order."""
        rootfs = _as_object(self.fields.get("rootfs"), "image config rootfs")
        diff_ids = _required_list(rootfs, "diff_ids", "image config rootfs")
        if not all(isinstance(d, str) for d in diff_ids):
            raise ManifestError("image config: rootfs.diff_ids must be strings")
        return tuple(Digest.parse(str(d)) for d in diff_ids)

    def with_diff_ids(self, diff_ids: Iterable[Digest]) -> ImageConfig:
        """A copy with ``rootfs.diff_ids`` replaced; everything else is unchanged."""
        fields = copy.deepcopy(dict(self.fields))
        old_rootfs = fields.get("rootfs")
        rootfs = dict(old_rootfs) if isinstance(old_rootfs, dict) else {"type": "layers"}
        rootfs["diff_ids"] = [str(d) for d in diff_ids]
        fields["rootfs"] = rootfs
        return ImageConfig(fields)

    @property
    def platform(self) -> Platform:
        """The platform the config declares (its top-level os/architecture/variant)."""
        return Platform.from_json(self.fields)
