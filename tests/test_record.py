"""Records (model/record.py): what the client's modules use instead of frozen dataclasses,
so that ``lazyfs mount`` does not import dataclasses. They behave as those dataclasses did."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs.model.digest import Digest
from lazyfs.model.reference import Reference
from lazyfs.mount.mountinfo import MountEntry
from lazyfs.registry.credentials import Credentials
from lazyfs.service.paths import ServicePaths

DIGEST = Digest("sha256", "a" * 64)


def test_a_record_compares_hashes_and_prints_as_a_frozen_dataclass() -> None:
    ref = Reference("localhost:5000", "app", "v1", DIGEST)
    same = Reference("localhost:5000", "app", tag="v1", digest=DIGEST)
    assert ref == same and hash(ref) == hash(same) and len({ref, same}) == 1
    assert ref != ref.with_tag(None) and ref != ("localhost:5000", "app", "v1", DIGEST)
    assert repr(ref) == (
        f"Reference(registry='localhost:5000', repository='app', tag='v1', digest={DIGEST!r})"
    )
    entry = MountEntry(Path("/mnt"), "fuse.lazyfs", "lazyfs")
    assert entry != Reference("localhost:5000", "app")  # another class is never equal
    assert (
        repr(entry)
        == "MountEntry(mountpoint=PosixPath('/mnt'), fstype='fuse.lazyfs', source='lazyfs')"
    )


def test_a_record_refuses_assignment() -> None:
    ref = Reference.parse("app")
    with pytest.raises(AttributeError, match="cannot assign to field 'tag'"):
        ref.tag = "v2"
    with pytest.raises(AttributeError):
        del ref.registry
    with pytest.raises(AttributeError):
        ref.other = 1


def test_a_record_survives_copy_and_pickle() -> None:
    paths = ServicePaths.in_run_dir(Path("/run/lazyfs/default"))
    ref = Reference.parse("localhost:5000/app:v1").with_digest(DIGEST)
    for record in (ref, paths, Credentials("user", "secret")):
        assert copy.copy(record) == copy.deepcopy(record) == record
        assert pickle.loads(pickle.dumps(record)) == record


def test_a_secret_stays_out_of_repr() -> None:
    assert repr(Credentials("user", "s3cret")) == "Credentials(username='user')"


def test_the_mount_client_imports_no_dataclasses() -> None:
    """``lazyfs mount``'s modules, as a client imports them: no dataclasses (7-10 ms with
    inspect), no shutil (argparse asks the terminal's width only to format help)."""
    code = (
        "import sys; from lazyfs.cli import main, mount; main.build_parser('mount'); "
        "import lazyfs.registry.credentials; "
        "print(' '.join(m for m in ('dataclasses', 'inspect', 'shutil') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert done.stdout.strip() == ""
