"""``lazyfs profile push REF PROFILE`` and ``lazyfs profile show REF``: access profiles kept
in the registry next to the image, as artifacts whose subject is its manifest (referrers API,
or the referrers tag schema where the registry has none: lazyfs/registry/referrers.py).
``lazyfs mount`` finds the newest one and prefetches what it reads; the image's digest does
not change."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lazyfs.cli.common import (
    add_registry_flags,
    credentials,
    parse_platform,
    print_json,
    registry_config,
    run_trio,
)
from lazyfs.model.platform import Platform


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser("profile", help="access profiles kept next to an image")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    push = actions.add_parser("push", help="attach an access profile to an image")
    push.add_argument("reference", metavar="REF")
    push.add_argument("profile", metavar="PROFILE", type=Path)
    show = actions.add_parser("show", help="print the newest access profile of an image")
    show.add_argument("reference", metavar="REF")
    show.add_argument("-o", "--output", type=Path, help="write it to a file instead")
    for sub in (push, show):
        sub.add_argument("--platform", type=parse_platform, help="of an index (default: host)")
        sub.add_argument("--json", action="store_true", help="print the result as JSON")
        add_registry_flags(sub, directional=False)
        sub.set_defaults(handler=lambda args: run_trio(lambda: run_profile(args)))


async def run_profile(args: argparse.Namespace) -> int:
    from lazyfs.errors import ProfileError
    from lazyfs.localfiles import AtomicFile
    from lazyfs.model.profiles import AccessProfile
    from lazyfs.model.reference import Reference
    from lazyfs.registry.client import RegistryClient
    from lazyfs.registry.referrers import find_profile, push_profile

    ref = Reference.parse(args.reference)
    profile = AccessProfile.load(args.profile) if args.action == "push" else None
    async with RegistryClient(registry_config(args), credentials(args)) as client:
        subject = await _image_manifest(client, ref, args.platform or Platform.host())
        pinned = ref.with_digest(subject.digest)
        if profile is not None:
            created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            digest = await push_profile(client, pinned, subject, profile, created)
            result = {"image": str(subject.digest), "artifact": str(digest)}
            reads = len(profile.reads)
            _report(args, {**result, "reads": reads}, f"attached {reads} reads to {pinned.digest}")
            return 0
        found = await find_profile(client, pinned, subject.digest)
    if found is None:
        raise ProfileError(f"{ref}: no access profile is attached to {subject.digest}")
    digest, stored = found
    if args.output is not None:
        with AtomicFile(args.output, f"access profile {args.output}") as out:
            out.write(stored.to_json())
            out.commit()
        result = {"image": str(subject.digest), "artifact": str(digest), "path": str(args.output)}
        reads = len(stored.reads)
        _report(args, {**result, "reads": reads}, f"wrote {reads} reads to {args.output}")
    else:
        sys.stdout.buffer.write(stored.to_json())
    return 0


async def _image_manifest(client: Any, ref: Any, platform: Platform) -> Any:
    """The descriptor of the image manifest ``ref`` names (its platform's, for an index)."""
    from lazyfs.model.manifests import Descriptor, Manifest, parse_manifest_or_index

    fetched = await client.get_manifest(ref)
    parsed = parse_manifest_or_index(fetched.data, fetched.media_type)
    if isinstance(parsed, Manifest):
        return Descriptor(fetched.media_type, fetched.digest, len(fetched.data))
    chosen = parsed.select(platform)
    return Descriptor(chosen.media_type, chosen.digest, chosen.size)


def _report(args: argparse.Namespace, result: dict[str, Any], line: str) -> None:
    if args.json:
        print_json(result)
    else:
        print(line, file=sys.stderr)
