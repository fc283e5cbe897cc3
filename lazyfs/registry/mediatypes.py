"""Manifest media types the registry client asks for and accepts."""

from __future__ import annotations

from typing import Final

OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST_V2: Final = "application/vnd.docker.distribution.manifest.v2+json"

# distribution 2.8 answers MANIFEST_UNKNOWN for an OCI manifest unless Accept lists the OCI types.
ALL_MANIFEST_TYPES: Final[tuple[str, ...]] = (
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2,
)
