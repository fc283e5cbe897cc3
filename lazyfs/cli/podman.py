"""``lazyfs podman-config DIR``: the storage.conf and containers.conf that make podman use
``lazyfs serve --store DIR`` as its additional layer store (lazyfs/service/podmanconf.py)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path, PurePosixPath
from typing import Any

from lazyfs.cli.common import print_json
from lazyfs.service.podmanconf import (
    CONTAINERS_CONF_ENV,
    CONTAINERS_CONF_PATH,
    STORAGE_CONF_ENV,
    STORAGE_CONF_PATH,
    podman_config,
)

_SYSTEMD_BOOTED = Path("/run/systemd/system")  # what sd_booted(3) checks


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser(
        "podman-config",
        help="print the podman configuration that uses lazyfs serve --store DIR",
        description="Print a storage.conf and a containers.conf with which podman looks layers "
        "up in the additional layer store that `lazyfs serve --store DIR` exposes.",
    )
    parser.add_argument("store", metavar="DIR", type=Path, help="the store directory")
    parser.add_argument("--graphroot", type=Path, help="podman's storage (default: podman's)")
    parser.add_argument("--runroot", type=Path, help="podman's run state (default: podman's)")
    parser.add_argument("--json", action="store_true", help="both files' text and place as JSON")
    parser.set_defaults(handler=run_podman_config)


def _absolute(path: Path | None) -> PurePosixPath | None:
    return None if path is None else PurePosixPath(os.path.abspath(path))


def run_podman_config(args: argparse.Namespace) -> int:
    config = podman_config(
        _absolute(args.store),
        _absolute(args.graphroot),
        _absolute(args.runroot),
        systemd=_SYSTEMD_BOOTED.is_dir(),
    )
    if args.json:
        print_json(
            {
                "storage_conf": {
                    "path": STORAGE_CONF_PATH,
                    "env": STORAGE_CONF_ENV,
                    "text": config.storage_conf,
                },
                "containers_conf": {
                    "path": CONTAINERS_CONF_PATH,
                    "env": CONTAINERS_CONF_ENV,
                    "text": config.containers_conf,
                },
            }
        )
    else:
        print(config.storage_conf)
        print(config.containers_conf, end="")
    return 0
