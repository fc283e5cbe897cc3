"""The peer: stargz-store as podman's additional layer store, and its eStargz image.

``lazyfs bench --peer-store PATH`` runs PATH (stargz-store, built by ../shared/peer/build.sh)
as a third runtime mode, ``podman-peer``, on the same registry and link as the others:

- :func:`ensure_estargz` converts each layer of the image as built with ``estargz-conv`` (the
  peer build's converter, found beside PATH), and writes an OCI layout whose manifest takes
  digests, sizes and annotations from the converter's JSON, and whose config takes its diffIDs
  (an eStargz layer's tar is not the original one). Cached under the image directory, keyed by
  the built image's manifest digest and the converter;
- :func:`push_estargz` pushes it as ``:estargz``;
- :func:`peer_store` starts ``PATH -config C -root R MOUNTPOINT`` with a config of our own per
  run (the link's registry host as a plain-HTTP mirror of itself, no background fetch: lazy
  only, like lazyfs without fill), waits for the mount (*service up*) and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazyfs.bench.images import TAG, BenchImage
from lazyfs.bench.processes import stop_process
from lazyfs.convert.layout import OciLayout
from lazyfs.errors import LazyfsError
from lazyfs.model.digest import Digest
from lazyfs.model.manifests import Descriptor, Manifest
from lazyfs.mount import mountinfo

ESTARGZ_TAG = "estargz"
CONVERTER = "estargz-conv"
_CONVERT_TIMEOUT_S = 1800.0
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 20.0
_POLL_S = 0.005
_COPY_BYTES = 1 << 20
_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
_DOCKER_GZIP_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

Progress = Callable[[str], None]


def converter_beside(store: Path) -> Path:
    return store.parent / CONVERTER


# --- the eStargz image ------------------------------------------------------------------------


def ensure_estargz(image: BenchImage, store: Path, image_dir: Path, progress: Progress) -> Path:
    """The eStargz conversion of ``image`` as an OCI layout (tag ``latest``), cached."""
    built = OciLayout(image.built)
    descriptor = built.resolve(TAG)
    converter = converter_beside(store)
    key = f"{descriptor.digest} {_file_digest(converter)}"
    layout_dir = image_dir / image.name / "estargz"
    stamp = image_dir / image.name / "estargz.key"
    if stamp.is_file() and stamp.read_text().strip() == key and _tagged(layout_dir):
        return layout_dir
    progress(f"{image.name}: converting each layer to eStargz with {converter}")
    shutil.rmtree(layout_dir, ignore_errors=True)
    manifest = Manifest.parse(built.read_blob(descriptor.digest), descriptor.media_type)
    layout = OciLayout.create(layout_dir)
    work = layout_dir.parent / "estargz-work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        converted = [
            _convert_layer(built, layer, converter, work, layout) for layer in manifest.layers
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = json.loads(built.read_blob(manifest.config.digest))
    config["rootfs"] = {"type": "layers", "diff_ids": [diff_id for _, diff_id in converted]}
    layout.add_image(json.dumps(config).encode(), [layer for layer, _ in converted], TAG)
    stamp.write_text(key + "\n")
    return layout_dir


def _tagged(layout: Path) -> bool:
    try:
        return TAG in OciLayout(layout).tags()
    except LazyfsError:
        return False


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        for block in iter(lambda: data.read(_COPY_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_layer(
    built: OciLayout, layer: Descriptor, converter: Path, work: Path, layout: OciLayout
) -> tuple[Descriptor, str]:
    """One layer: its tar, ``estargz-conv`` of it, the blob moved into ``layout``."""
    if layer.media_type not in (_GZIP_LAYER, _DOCKER_GZIP_LAYER):
        raise LazyfsError(f"eStargz conversion: layer {layer.digest} is {layer.media_type}")
    tar, out = work / "layer.tar", work / "layer.esgz"
    with gzip.open(built.blob_path(layer.digest), "rb") as source, tar.open("wb") as dest:
        shutil.copyfileobj(source, dest, _COPY_BYTES)
    result = subprocess.run(
        [str(converter), "-in", str(tar), "-out", str(out)],
        capture_output=True, text=True, check=False, timeout=_CONVERT_TIMEOUT_S,
    )  # fmt: skip
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise LazyfsError(f"{converter} failed: {lines[-1]}")
    fields = _converted_fields(result.stdout)
    digest = Digest.parse(fields["digest"])
    layout.add_blob_file(out, digest)
    tar.unlink()
    descriptor = Descriptor(
        fields["mediaType"], digest, int(fields["size"]), dict(fields["annotations"])
    )
    return descriptor, str(Digest.parse(fields["diffID"]))


def _converted_fields(stdout: str) -> dict[str, Any]:
    """The converter's JSON line, with the fields a manifest needs checked."""
    try:
        fields = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise LazyfsError(f"{CONVERTER} printed no JSON: {stdout[:200]!r}") from exc
    wanted = {"digest": str, "size": int, "diffID": str, "mediaType": str, "annotations": dict}
    if not isinstance(fields, dict) or any(
        not isinstance(fields.get(name), kind) for name, kind in wanted.items()
    ):
        raise LazyfsError(f"{CONVERTER}: unexpected output {stdout[:200]!r}")
    return fields


def push_estargz(layout: Path, repository: str) -> None:
    """``skopeo copy`` the layout to ``REPOSITORY:estargz``, digests as converted."""
    result = subprocess.run(
        ["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
         f"oci:{layout}:{TAG}", f"docker://{repository}:{ESTARGZ_TAG}"],
        capture_output=True, text=True, check=False, timeout=_CONVERT_TIMEOUT_S,
    )  # fmt: skip
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise LazyfsError(f"pushing the eStargz image to {repository}: {lines[-1]}")


# --- the store process -------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningPeer:
    pid: int
    mountpoint: Path
    log: Path
    up_s: float


def peer_config(registry_host: str) -> str:
    """stargz-store's TOML: plain HTTP to the registry, nothing fetched in the background."""
    return (
        "no_background_fetch = true\n"
        f'[[resolver.host."{registry_host}".mirrors]]\n'
        f'host = "{registry_host}"\n'
        "insecure = true\n"
    )


@contextlib.contextmanager
def peer_store(binary: Path, work: Path, registry_host: str) -> Iterator[RunningPeer]:
    """``binary`` serving a layer store at ``work/peer-mnt`` with an empty root; stopped (and
    its mount detached) afterwards."""
    config, root, mountpoint = work / "peer.toml", work / "peer-root", work / "peer-mnt"
    log = work / "peer.log"
    config.write_text(peer_config(registry_host))
    root.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    argv = [str(binary), "-config", str(config), "-root", str(root), "-log-level", "info"]
    with log.open("wb") as log_file:
        started = time.monotonic()
        process = subprocess.Popen(
            [*argv, str(mountpoint)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        up_s = _wait_for_mount(process, mountpoint, log, started)
        yield RunningPeer(process.pid, mountpoint, log, up_s)
    finally:
        _stop(process, mountpoint)


def _wait_for_mount(
    process: subprocess.Popen[bytes], mountpoint: Path, log: Path, started: float
) -> float:
    deadline = started + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise LazyfsError(f"the peer store exited ({process.returncode}): {tail[0]}")
        if mountinfo.is_mounted(mountpoint):
            return time.monotonic() - started
        time.sleep(_POLL_S)
    raise LazyfsError(f"the peer store did not mount {mountpoint} in {_START_TIMEOUT_S:.0f} s")


def _stop(process: subprocess.Popen[bytes], mountpoint: Path) -> None:
    stop_process(process, _STOP_TIMEOUT_S)
    if mountinfo.is_mounted(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
