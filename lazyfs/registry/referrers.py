"""Artifacts that refer to an image: OCI 1.1's referrers API, and its tag schema fallback.

An artifact is an image manifest with an ``artifactType``, an empty config and a ``subject``
(the image's manifest descriptor); the image's digest does not change. A registry with the
referrers API (``GET /v2/<name>/referrers/<digest>``) lists them itself. One without it
(distribution 2.8, Debian's docker-registry) keeps them, by the OCI distribution spec's
referrers tag schema, in an image index tagged ``<algorithm>-<hex>`` of the subject's digest,
which the pusher updates (read, add, write: the spec's own race between two pushers).

Used for access profiles (``lazyfs profile push``; mounts find them: mount/image.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from lazyfs.errors import NotFoundError, ProfileError
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import OCI_EMPTY, OCI_INDEX, OCI_MANIFEST, Descriptor, Index, Manifest
from lazyfs.model.profiles import AccessProfile
from lazyfs.model.reference import Reference
from lazyfs.registry.client import RegistryClient

log = logging.getLogger(__name__)

EMPTY_CONFIG = b"{}"
CREATED_ANNOTATION = "org.opencontainers.image.created"


def fallback_tag(subject: Digest) -> str:
    """The referrers tag schema's tag for ``subject``."""
    return f"{subject.algorithm}-{subject.hex}"


async def find_referrers(
    client: RegistryClient, ref: Reference, subject: Digest, artifact_type: str
) -> list[Descriptor]:
    """The artifacts of ``artifact_type`` whose subject is ``subject``, oldest first (by their
    creation annotation, else as listed)."""
    index = await _referrers_index(client, ref, subject, artifact_type)
    if index is None:
        return []
    found = [d for d in index.manifests if d.extra.get("artifactType") == artifact_type]
    return sorted(found, key=lambda d: d.annotations.get(CREATED_ANNOTATION, ""))


async def _referrers_index(
    client: RegistryClient, ref: Reference, subject: Digest, artifact_type: str
) -> Index | None:
    data = await client.get_referrers(ref, subject, artifact_type)
    if data is not None:
        return Index.parse(data, OCI_INDEX)
    try:
        fetched = await client.get_manifest(_tagged(ref, subject), (OCI_INDEX,))
    except NotFoundError:
        return None
    return Index.parse(fetched.data, fetched.media_type)


async def push_referrer(
    client: RegistryClient,
    ref: Reference,
    subject: Descriptor,
    artifact_type: str,
    blob: bytes,
    annotations: Mapping[str, str],
) -> Digest:
    """Push ``blob`` as an artifact whose subject is ``subject``; returns its digest. With no
    referrers API, the subject's tag schema index gains it too."""
    config = await client.push_blob_bytes(ref, EMPTY_CONFIG)
    layer = await client.push_blob_bytes(ref, blob)
    manifest = Manifest(
        OCI_MANIFEST,
        Descriptor(OCI_EMPTY, config, len(EMPTY_CONFIG)),
        (Descriptor(artifact_type, layer, len(blob)),),
        dict(annotations),
        {"artifactType": artifact_type, "subject": _bare(subject).to_json()},
    )
    data = manifest.to_bytes()
    # By digest: under the reference's tag it would replace the image.
    untagged = Reference(ref.registry, ref.repository, None, Digest.of(data))
    digest = await client.push_manifest(untagged, OCI_MANIFEST, data)
    if await client.get_referrers(ref, subject.digest, artifact_type) is None:
        await _add_to_fallback_index(client, ref, subject.digest, manifest, digest, len(data))
    return digest


async def _add_to_fallback_index(
    client: RegistryClient,
    ref: Reference,
    subject: Digest,
    manifest: Manifest,
    digest: Digest,
    size: int,
) -> None:
    tag = _tagged(ref, subject)
    try:
        fetched = await client.get_manifest(tag, (OCI_INDEX,))
        index = Index.parse(fetched.data, fetched.media_type)
    except NotFoundError:
        index = Index(OCI_INDEX, ())
    entry = Descriptor(
        OCI_MANIFEST,
        digest,
        size,
        manifest.annotations,
        extra={"artifactType": manifest.extra["artifactType"]},
    )
    kept = [d for d in index.manifests if d.digest != digest]
    updated = index.with_manifests([*kept, entry])
    await client.push_manifest(tag, OCI_INDEX, updated.to_bytes())
    log.info("referrers tag %s of %s now lists %d artifacts", tag.tag, ref.name, len(kept) + 1)


def _tagged(ref: Reference, subject: Digest) -> Reference:
    return Reference(ref.registry, ref.repository, fallback_tag(subject))


def _bare(descriptor: Descriptor) -> Descriptor:
    """A subject names the manifest only: media type, digest, size."""
    return Descriptor(descriptor.media_type, descriptor.digest, descriptor.size)


# --- access profiles ---------------------------------------------------------------------------

PROFILE_ARTIFACT_TYPE = "application/vnd.lazyfs.access-profile.v1+json"
PROFILE_MAX_BYTES = 16 << 20  # a profile lists reads: far below this


async def push_profile(
    client: RegistryClient,
    ref: Reference,
    subject: Descriptor,
    profile: AccessProfile,
    created: str,
) -> Digest:
    """Attach ``profile`` to the image manifest ``subject``, as an artifact."""
    annotations = {CREATED_ANNOTATION: created}
    data = AccessProfile(profile.reads, str(subject.digest)).to_json()
    return await push_referrer(client, ref, subject, PROFILE_ARTIFACT_TYPE, data, annotations)


async def find_profile(
    client: RegistryClient, ref: Reference, subject: Digest
) -> tuple[Digest, AccessProfile] | None:
    """The newest access profile attached to ``subject``, and its artifact's digest."""
    found = await find_referrers(client, ref, subject, PROFILE_ARTIFACT_TYPE)
    if not found:
        return None
    newest = found[-1]
    fetched = await client.get_manifest(ref.with_digest(newest.digest), (OCI_MANIFEST,))
    manifest = Manifest.parse(fetched.data, fetched.media_type)
    layers = [d for d in manifest.layers if d.media_type == PROFILE_ARTIFACT_TYPE]
    if len(layers) != 1 or layers[0].size > PROFILE_MAX_BYTES:
        raise ProfileError(f"artifact {newest.digest} is not one access profile")
    data = await client.get_blob(ref, layers[0].digest, layers[0].size)
    return newest.digest, AccessProfile.parse(data)
