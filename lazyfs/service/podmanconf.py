"""The podman configuration that uses ``lazyfs serve --store DIR`` as its additional layer store.

Pure text: :func:`podman_config` returns a ``storage.conf`` (overlay driver, graphroot, runroot,
``additionallayerstores = ["DIR:ref"]``) and a ``containers.conf`` (runc, bounded ulimits, a
cgroup manager and events logger that work without systemd); :func:`registries_conf` a
``registries.conf`` that speaks plain HTTP to the given registries. ``lazyfs podman-config``
prints the first two; :func:`write_private_config`, for the tests and ``lazyfs bench``, writes
all three to private files and gives the environment that points ``CONTAINERS_STORAGE_CONF``,
``CONTAINERS_CONF`` and ``CONTAINERS_REGISTRIES_CONF`` at them.

containers/storage reads a layer store entry as ``PATH[:ref]`` and a list of them split at
commas, so a store path may hold neither ``:`` nor ``,``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lazyfs.errors import UsageError

DEFAULT_GRAPHROOT = PurePosixPath("/var/lib/containers/storage")
DEFAULT_RUNROOT = PurePosixPath("/run/containers/storage")
STORAGE_CONF_PATH = "/etc/containers/storage.conf"
STORAGE_CONF_ENV = "CONTAINERS_STORAGE_CONF"
CONTAINERS_CONF_PATH = "/etc/containers/containers.conf"
CONTAINERS_CONF_ENV = "CONTAINERS_CONF"
REGISTRIES_CONF_ENV = "CONTAINERS_REGISTRIES_CONF"
# podman's defaults exceed this machine's hard nofile limit (20000): runc then fails to start.
DEFAULT_ULIMITS = ("nofile=1024:1024", "nproc=1024:1024")
RUNTIME = "runc"  # crun here: "cgroups in hybrid mode not supported"
_STORE_FORBIDDEN = frozenset(":,")


@dataclass(frozen=True)
class PodmanConfig:
    """The text of the two files, each starting with a comment saying where it goes."""

    storage_conf: str
    containers_conf: str


def podman_config(
    store: PurePosixPath | None,
    graphroot: PurePosixPath | None = None,
    runroot: PurePosixPath | None = None,
    *,
    systemd: bool = False,
) -> PodmanConfig:
    """The configuration for a podman that looks layers up in ``store`` (none: no layer store).

    ``systemd``: the host runs systemd and journald (cgroup manager and events logger); else
    cgroupfs and an events file. With a private ``runroot``, podman's own temporary directory
    goes under it too, so that this podman shares no state with another."""
    if store is not None:
        _check_store(store)
    graph = _checked("graphroot", graphroot or DEFAULT_GRAPHROOT)
    run = _checked("runroot", runroot or DEFAULT_RUNROOT)
    tmp_dir = None if runroot is None else run / "libpod-tmp"
    return PodmanConfig(
        storage_conf(store, graph, run), containers_conf(systemd=systemd, tmp_dir=tmp_dir)
    )


def storage_conf(
    store: PurePosixPath | None, graphroot: PurePosixPath, runroot: PurePosixPath
) -> str:
    lines = [
        f"# storage.conf: put it at {STORAGE_CONF_PATH}, or point ${STORAGE_CONF_ENV} at it",
        "[storage]",
        'driver = "overlay"',
        f"graphroot = {_string(str(graphroot))}",
        f"runroot = {_string(str(runroot))}",
        "",
        "[storage.options]",
    ]
    if store is not None:
        lines.insert(1, f"# layers are looked up in {store} first (lazyfs serve --store {store})")
        lines.append(f"additionallayerstores = [{_string(f'{store}:ref')}]")
    else:
        lines.append("additionallayerstores = []")
    return "\n".join(lines) + "\n"


def containers_conf(*, systemd: bool = False, tmp_dir: PurePosixPath | None = None) -> str:
    lines = [
        f"# containers.conf: put it at {CONTAINERS_CONF_PATH}, "
        f"or point ${CONTAINERS_CONF_ENV} at it",
        "[containers]",
        f"default_ulimits = [{', '.join(_string(limit) for limit in DEFAULT_ULIMITS)}]",
        "",
        "[engine]",
        f"runtime = {_string(RUNTIME)}",
        f"cgroup_manager = {_string('systemd' if systemd else 'cgroupfs')}",
        f"events_logger = {_string('journald' if systemd else 'file')}",
    ]
    if tmp_dir is not None:
        lines.append(f"tmp_dir = {_string(str(_checked('tmp_dir', tmp_dir)))}")
    return "\n".join(lines) + "\n"


def registries_conf(insecure_hosts: Sequence[str]) -> str:
    """A ``registries.conf``: no short-name search, plain HTTP to each ``HOST:PORT`` given."""
    lines = ["# registries.conf: point $CONTAINERS_REGISTRIES_CONF at it"]
    lines += ["unqualified-search-registries = []", 'short-name-mode = "disabled"']
    for host in insecure_hosts:
        if not host or any(c in host for c in '/"\\ ') or not host.isprintable():
            raise UsageError(f"invalid registry host {host!r}: expected HOST[:PORT]")
        lines += ["", "[[registry]]", f"location = {_string(host)}", "insecure = true"]
    return "\n".join(lines) + "\n"


def write_private_config(
    root: Path, store: Path | None = None, insecure: Sequence[str] = ()
) -> dict[str, str]:
    """Write the three files under ``root`` (graphroot and runroot below it too, ``insecure``
    registries over plain HTTP); this environment with the variables that make podman read
    them and nothing of the system's, and a private XDG_RUNTIME_DIR."""
    root.mkdir(parents=True, exist_ok=True)
    config = podman_config(
        None if store is None else PurePosixPath(store),
        PurePosixPath(root / "graph"),
        PurePosixPath(root / "run"),
    )
    files = {
        STORAGE_CONF_ENV: ("storage.conf", config.storage_conf),
        CONTAINERS_CONF_ENV: ("containers.conf", config.containers_conf),
        REGISTRIES_CONF_ENV: ("registries.conf", registries_conf(insecure)),
    }
    env = {key: value for key, value in os.environ.items() if not key.startswith("CONTAINERS_")}
    for variable, (name, text) in files.items():
        (root / name).write_text(text)
        env[variable] = str(root / name)
    (root / "xdg").mkdir(mode=0o700, exist_ok=True)
    env["XDG_RUNTIME_DIR"] = str(root / "xdg")  # podman keeps nothing of ours in /run/user
    return env


def _check_store(store: PurePosixPath) -> None:
    _checked("store directory", store)
    if _STORE_FORBIDDEN & set(str(store)):
        raise UsageError(
            f"store directory {store}: containers/storage cannot name a path with : or ,"
        )


def _checked(what: str, path: PurePosixPath) -> PurePosixPath:
    text = str(path)
    if not path.is_absolute():
        raise UsageError(f"{what} {text}: must be an absolute path")
    if not text.isprintable():
        raise UsageError(f"{what} {text!r}: must not contain control characters")
    return path


def _string(text: str) -> str:
    """A TOML basic string (the checks above leave no control character to escape)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
