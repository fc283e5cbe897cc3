"""Benchmark images, built here: ordinary OCI images with gzip layers, and their conversions.

- ``python``: Debian bookworm minbase, plus python3 in a second layer;
- ``gcc``: the same base layer, plus gcc and libc6-dev;
- ``busybox``: a one-layer image around the host's static busybox (a quick smoke test).

The Debian images are built with mmdebstrap from the host's apt sources, the way a Dockerfile
``FROM debian`` + ``RUN apt-get install`` would layer them: the base layer is the minbase tree,
and the top layer holds what installing the packages added or changed (with whiteouts for what
it removed). Both images share the very same base layer blob, as real images do. This module
owns the recipes and the layering; :mod:`lazyfs.convert.imagebuild` writes the images.

Everything is cached under ``IMAGE_DIR/NAME/``: a recipe that has not changed is not rebuilt,
and an image already converted is not converted again. Any other image can be benchmarked as
``oci:PATH[:TAG]`` with an explicit workload; its conversion is cached by manifest digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from lazyfs.bench.command import lazyfs_command
from lazyfs.convert.imagebuild import (
    FIXED_MTIME,
    ContainerConfig,
    Entry,
    directory,
    file_read_when_written,
    regular_file,
    symlink,
    tar_member,
    whiteout,
    write_image,
    write_tar_image,
)
from lazyfs.convert.layout import OciLayout
from lazyfs.errors import LazyfsError, UsageError

SUITE = "bookworm"
SOURCE_DATE_EPOCH = str(FIXED_MTIME)  # mmdebstrap's trees: the builder's fixed mtime
TAG = "latest"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "cat", "echo", "ls", "head", "true", "sleep", "wc")
_COPY_BYTES = 1 << 20
_MMDEBSTRAP_TIMEOUT_S = 1800
_DPKG_EXCLUDES = (
    # What debian:bookworm-slim leaves out (docs, man pages, translations).
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
)
_HELLO_C = "'#include <stdio.h>' 'int main(void) { puts(\"hello, world\"); return 0; }'"
_DEBIAN_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """How to build one benchmark image, and its default workload."""

    name: str
    packages: tuple[str, ...]
    command: tuple[str, ...]
    ready_line: str | None = None
    description: str = ""

    def key(self, sources: list[str]) -> str:
        fields = {**asdict(self), "sources": sources, "excludes": _DPKG_EXCLUDES, "v": 1}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


RECIPES: dict[str, Recipe] = {  # names as in lazyfs.bench.IMAGE_NAMES
    "python": Recipe(
        "python",
        ("python3",),
        ("python3", "-c", "import json, asyncio, sqlite3, email"),
        description="bookworm minbase + python3",
    ),
    "gcc": Recipe(
        "gcc",
        ("gcc", "libc6-dev"),
        (
            "sh",
            "-c",
            f"printf '%s\\n' {_HELLO_C} > /tmp/hello.c"
            " && gcc -o /tmp/hello /tmp/hello.c && /tmp/hello",
        ),
        description="bookworm minbase + gcc, libc6-dev",
    ),
    "busybox": Recipe(
        "busybox",
        (),
        ("sh", "-c", "cat /etc/motd && head -c 65536 /usr/share/data/blob | wc -c && echo ready"),
        ready_line="ready",
        description="static busybox (smoke test)",
    ),
}


@dataclass(frozen=True)
class BenchImage:
    """An image ready to push: the image as built, its conversion, and its workload."""

    name: str
    built: Path
    chunked: Path
    command: tuple[str, ...]
    ready_line: str | None

    @property
    def built_ref(self) -> str:
        return f"oci:{self.built}:{TAG}"

    @property
    def chunked_ref(self) -> str:
        return f"oci:{self.chunked}:{TAG}"


def default_image_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lazyfs" / "bench" / "images"


def ensure_image(
    name: str,
    image_dir: Path,
    progress: Progress,
    command: tuple[str, ...] | None = None,
    ready_line: str | None = None,
) -> BenchImage:
    """Build (or find cached) and convert the image ``name``: a recipe, or ``oci:PATH[:TAG]``."""
    if name.startswith("oci:"):
        if not command:
            raise UsageError(f"{name}: an image that is not a built-in recipe needs --workload")
        return _custom_image(name, image_dir, command, ready_line, progress)
    recipe = RECIPES.get(name)
    if recipe is None:
        raise UsageError(f"unknown image {name!r} (built-in: {', '.join(RECIPES)}, or oci:PATH)")
    built = _ensure_built(recipe, image_dir, progress)
    chunked = _ensure_converted(f"oci:{built}:{TAG}", image_dir / name / "chunked", progress)
    custom = command is not None or ready_line is not None
    return BenchImage(
        name,
        built,
        chunked,
        command or recipe.command,
        ready_line if custom else recipe.ready_line,
    )


def _has_tag(layout: Path, tag: str = TAG) -> bool:
    try:
        return tag in OciLayout(layout).tags()
    except LazyfsError:
        return False


def _ensure_converted(source_ref: str, dest: Path, progress: Progress) -> Path:
    if _has_tag(dest):
        return dest
    progress(f"converting {source_ref} to zstd:chunked")
    shutil.rmtree(dest, ignore_errors=True)
    lazyfs_command("convert", "-q", source_ref, f"oci:{dest}:{TAG}")
    return dest


def _custom_image(
    reference: str,
    image_dir: Path,
    command: tuple[str, ...],
    ready_line: str | None,
    progress: Progress,
) -> BenchImage:
    """Any local OCI layout: copied as built (so it can be pushed), converted, cached."""
    path, _, tag = reference.removeprefix("oci:").partition(":")
    layout_path = Path(path).resolve()
    try:
        descriptor = OciLayout(layout_path).resolve(tag or None)
    except LazyfsError as exc:
        raise UsageError(f"image {reference}: {exc}") from exc
    source = f"oci:{layout_path}" + (f":{tag}" if tag else "")
    name = f"custom-{descriptor.digest.hex[:12]}"
    built = image_dir / name / "built"
    if not _has_tag(built):
        shutil.rmtree(built, ignore_errors=True)
        built.parent.mkdir(parents=True, exist_ok=True)
        skopeo("copy", "--quiet", source, f"oci:{built}:{TAG}")
    chunked = _ensure_converted(f"oci:{built}:{TAG}", image_dir / name / "chunked", progress)
    return BenchImage(name, built, chunked, command, ready_line)


def skopeo(*args: str) -> None:
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise LazyfsError(f"skopeo {args[0]} failed: {lines[-1]}")


# --- building --------------------------------------------------------------------------------


def _ensure_built(recipe: Recipe, image_dir: Path, progress: Progress) -> Path:
    layout = image_dir / recipe.name / "oci"
    stamp = image_dir / recipe.name / "recipe.sha256"
    sources = [] if recipe.name == "busybox" else debian_sources()
    key = recipe.key(sources)
    if _has_tag(layout) and stamp.exists() and stamp.read_text().strip() == key:
        return layout
    shutil.rmtree(layout, ignore_errors=True)
    work = image_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    container = ContainerConfig(command=recipe.command, env=(_DEBIAN_PATH,))
    if recipe.name == "busybox":
        progress("writing the busybox image (1 gzip layer)")
        write_image(layout, TAG, [busybox_layer()], container=container)
    else:
        tars = _debian_tars(recipe, sources, image_dir, progress)
        progress(f"writing the {recipe.name} image ({len(tars)} gzip layers)")
        write_tar_image(layout, TAG, tars, container=container)
        for tar in tars:
            tar.unlink(missing_ok=True)
    stamp.write_text(key + "\n")
    return layout


def debian_sources() -> list[str]:
    """``deb URI SUITE COMPONENT`` lines for the host's bookworm sources (apt's mirror)."""
    try:
        out = subprocess.run(
            ["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE) $(COMPONENT)"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    lines = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].startswith(SUITE) and parts[2] == "main":
            lines.add(f"deb {parts[0]} {parts[1]} main")
    return sorted(lines) or [f"deb {FALLBACK_MIRROR} {SUITE} main"]


def _apt_options() -> list[str]:
    """The host's answers to Check-Valid-Until and Check-Date (snapshot mirrors need them)."""
    options = []
    for name in ("Acquire::Check-Valid-Until", "Acquire::Check-Date"):
        result = subprocess.run(
            ["apt-config", "shell", "V", name], capture_output=True, text=True, check=False
        )
        value = result.stdout.strip().removeprefix("V=").strip("'")
        if value:
            options.append(f'--aptopt={name} "{value}"')
    return options


def _mmdebstrap(packages: tuple[str, ...], sources: list[str], out: Path, log: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        raise LazyfsError("mmdebstrap not found (install the Debian package mmdebstrap)")
    argv = ["mmdebstrap", "--variant=minbase", "--quiet", *_apt_options()]
    argv += [f"--dpkgopt={option}" for option in _DPKG_EXCLUDES]
    if packages:
        argv.append(f"--include={','.join(packages)}")
    partial = out.with_suffix(".partial.tar")
    argv += [SUITE, str(partial), *sources]
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
    with log.open("w") as log_file:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=_MMDEBSTRAP_TIMEOUT_S,
            check=False,
        )
    if result.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise LazyfsError(f"mmdebstrap failed (log {log}): {' | '.join(tail)}")
    partial.replace(out)


def _debian_tars(
    recipe: Recipe, sources: list[str], image_dir: Path, progress: Progress
) -> list[Path]:
    base = image_dir / "base" / f"{SUITE}-minbase.tar"
    base_key = image_dir / "base" / "sources"
    base.parent.mkdir(parents=True, exist_ok=True)
    wanted_key = json.dumps([sources, _DPKG_EXCLUDES])
    if not base.exists() or not base_key.exists() or base_key.read_text() != wanted_key:
        progress(f"building the {SUITE} minbase tree with mmdebstrap (about half a minute)")
        _mmdebstrap((), sources, base, base.with_suffix(".log"))
        base_key.write_text(wanted_key)
    work = image_dir / "work"
    full = work / f"{recipe.name}-full.tar"
    progress(f"building {recipe.description} with mmdebstrap (about a minute)")
    _mmdebstrap(recipe.packages, sources, full, work / f"{recipe.name}.log")
    base_layer = work / "base-layer.tar"
    top_layer = work / f"{recipe.name}-layer.tar"
    progress(f"layering {recipe.name}: base + what installing {' '.join(recipe.packages)} changed")
    copy_normalised(base, base_layer)
    diff_layer(base, full, top_layer)
    full.unlink()
    return [base_layer, top_layer]


# --- tar layers ------------------------------------------------------------------------------


def _normalised_name(name: str) -> str:
    return name.removeprefix("./").rstrip("/")


def _keep(name: str) -> bool:
    """Drop the root entry and the device nodes mmdebstrap puts in /dev (runtimes mount it)."""
    return name != "" and not name.startswith("dev/")


def _members(path: Path) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    with tarfile.open(path, "r:") as archive:
        for member in archive:
            name = _normalised_name(member.name)
            if not _keep(name):
                continue
            member.name = name
            member.pax_headers = {
                key: value
                for key, value in member.pax_headers.items()
                if key not in ("path", "linkpath")
            }
            if member.islnk():
                member.linkname = _normalised_name(member.linkname)
            yield archive, member


def _signature(archive: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    content = hashlib.sha256()
    if member.isfile():
        stream = archive.extractfile(member)
        assert stream is not None
        for block in iter(lambda: stream.read(_COPY_BYTES), b""):
            content.update(block)
    fields = (
        member.type.decode(),
        member.mode,
        member.uid,
        member.gid,
        member.mtime,
        member.size,
        member.linkname,
        member.devmajor,
        member.devminor,
        sorted(member.pax_headers.items()),
        content.hexdigest(),
    )
    return json.dumps(fields)


def _signatures(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Per entry name: its signature; and per hard link name: its target."""
    signatures, links = {}, {}
    for archive, member in _members(path):
        signatures[member.name] = _signature(archive, member)
        if member.islnk():
            links[member.name] = member.linkname
    return signatures, links


def _new_tar(out: Path) -> tarfile.TarFile:
    return tarfile.open(out, "w", format=tarfile.PAX_FORMAT)


def copy_normalised(source: Path, out: Path) -> None:
    with _new_tar(out) as layer:
        for archive, member in _members(source):
            _add(layer, archive, member)


def _add(layer: tarfile.TarFile, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    layer.addfile(member, archive.extractfile(member) if member.isfile() else None)


def changed_entries(
    base: dict[str, str], full: dict[str, str], links: dict[str, str]
) -> tuple[set[str], list[str]]:
    """What the upper layer must carry, and what it must white out.

    Hard links travel with their targets (both ways), so no link crosses layers."""
    emit = {name for name, sig in full.items() if base.get(name) != sig}
    for _ in range(len(links) + 1):  # bounded fixpoint
        before = len(emit)
        for link, target in links.items():
            if link in emit or target in emit:
                emit.update((link, target))
        if len(emit) == before:
            break
    removed = sorted(name for name in base if name not in full)
    gone_dirs = set(removed)
    whiteouts = [n for n in removed if os.path.dirname(n) not in gone_dirs]
    return emit, whiteouts


def diff_layer(base_tar: Path, full_tar: Path, out: Path) -> None:
    """Write the layer that turns ``base_tar``'s tree into ``full_tar``'s."""
    base, _ = _signatures(base_tar)
    full, links = _signatures(full_tar)
    emit, whiteouts = changed_entries(base, full, links)
    with _new_tar(out) as layer:
        for archive, member in _members(full_tar):
            if member.name in emit:
                _add(layer, archive, member)
        for name in whiteouts:
            layer.addfile(tar_member(whiteout(name)))


def busybox_layer() -> list[Entry]:
    """A tiny root: static busybox, a few applets, a text file and a 4 MiB data file."""
    if not BUSYBOX.is_file():
        raise LazyfsError(f"{BUSYBOX} not found (install the Debian package busybox-static)")
    dirs = ("bin", "etc", "tmp", "proc", "dev", "usr", "usr/share", "usr/share/data")
    return [
        *(directory(name) for name in dirs),
        file_read_when_written("bin/busybox", BUSYBOX.read_bytes, 0o755),
        *(symlink(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS),
        regular_file("etc/motd", b"Hello from the lazyfs bench busybox image.\n"),
        regular_file("usr/share/data/blob", hashlib.shake_256(b"lazyfs bench").digest(4 << 20)),
    ]
