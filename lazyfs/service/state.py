"""The state file: the mounts a service serves, so that a restarted one restores them.

Written atomically (a temp file renamed into place) after every change, in the run directory
(tmpfs: mounts do not outlive a reboot, and neither does this). Each entry holds the open
request that made the mount, less its credentials, which are never written anywhere: after a
restart, an image that needs them serves what the cache has and fetches the rest anonymously,
until it is mounted again.

An entry whose mount a clean shutdown removed is restored at the next start (``restore``:
"always"); one the service lost by dying is restored only if its mountpoint still holds the
dead mount, since a user who cleared that mount meanwhile asked for it to be gone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lazyfs.errors import LazyfsError
from lazyfs.localfiles import AtomicFile

log = logging.getLogger(__name__)

STATE_VERSION = 1
Restore = Literal["always", "if-stale"]


@dataclass(frozen=True)
class MountRecord:
    mountpoint: str
    request: dict[str, Any]  # the open request's arguments, credentials removed
    owner_uid: int = 0
    owner_gid: int = 0
    restore: Restore = "if-stale"


@dataclass
class ServiceState:
    path: Path
    mounts: dict[str, MountRecord] = field(default_factory=dict)
    # The layer store's use counts, by "<base64 reference>/<layer digest>" (layerstore.py).
    store_uses: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> ServiceState:
        try:
            document = json.loads(path.read_bytes())
            records = [MountRecord(**entry) for entry in document["mounts"]]
            uses = document.get("store_uses", {})
            store_uses = {str(k): int(v) for k, v in uses.items() if int(v) > 0}
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.error("ignoring unreadable state file %s: %s", path, exc)
            return cls(path)
        return cls(path, {record.mountpoint: record for record in records}, store_uses)

    def set_store_uses(self, uses: dict[str, int]) -> None:
        self.store_uses = dict(uses)
        self.save()

    def add(self, record: MountRecord) -> None:
        self.mounts[record.mountpoint] = record
        self.save()

    def remove(self, mountpoint: str) -> None:
        if self.mounts.pop(mountpoint, None) is not None:
            self.save()

    def mark_all(self, restore: Restore) -> None:
        self.mounts = {m: replace(r, restore=restore) for m, r in self.mounts.items()}
        self.save()

    def save(self) -> None:
        document = {
            "version": STATE_VERSION,
            "mounts": [asdict(r) for r in self.mounts.values()],
            "store_uses": self.store_uses,
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with AtomicFile(self.path, mode=0o600) as out:
                out.write(json.dumps(document, indent=1).encode())
                out.commit()
        except (OSError, LazyfsError) as exc:  # the mounts still work; a restart loses them
            log.error("cannot save the service state to %s: %s", self.path, exc)
