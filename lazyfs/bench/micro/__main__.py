"""``python -m lazyfs.bench.micro [NAME [ARGS...]]``: run one micro-benchmark by name; no name
runs them all.

Each benchmark is a module of this package with ``main(argv) -> int``; ``... NAME --help`` shows
its options, ``--list`` lists them, and ``--json-dir DIR`` runs them all and also writes
DIR/NAME.json for those that take ``--json``.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PACKAGE = "lazyfs.bench.micro"
PROG = f"python -m {PACKAGE}"

# name (of its module in this package) -> one-line description; with no name given they run
# in this order. Every benchmark but verity takes ``--json FILE``.
BENCHMARKS: dict[str, str] = {
    "verity": "userspace fs-verity digest speed vs plain sha256",
    "convert": "lazyfs convert throughput vs zstd -3 and gunzip",
    "chunking": "fastcdc chunk sizes: count, compression, dedup, over-fetch",
    "mount": "lazy mount over a loopback registry vs curl and native files",
    "warmread": "warm reads through lazyfs serve vs native files (issue 11)",
}


def usage() -> str:
    lines = [
        f"usage: {PROG} [--list] [--json-dir DIR] [NAME [ARGS...]]",
        "",
        "benchmarks:",
    ]
    lines += [f"  {name:<10} {description}" for name, description in BENCHMARKS.items()]
    lines += ["", "With no NAME, every benchmark runs with its defaults, one after the other."]
    return "\n".join(lines)


def run_one(name: str, argv: Sequence[str]) -> int:
    module = importlib.import_module(f"{PACKAGE}.{name}")
    code: int = module.main(list(argv))
    return code


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "--list", "list"):
        print(usage())
        return 0
    json_dir: Path | None = None
    if argv and argv[0] == "--json-dir":
        if len(argv) != 2:
            print(usage(), file=sys.stderr)
            return 2
        json_dir = Path(argv[1])
        json_dir.mkdir(parents=True, exist_ok=True)
        argv = []
    if argv:
        name = argv[0]
        if name not in BENCHMARKS:
            print(f"bench: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
            return 2
        return run_one(name, argv[1:])
    failed = []
    for name in BENCHMARKS:
        print(f"\n######## bench {name}\n", flush=True)
        started = time.monotonic()
        try:
            extra = (
                []
                if json_dir is None or name == "verity"
                else ["--json", str(json_dir / f"{name}.json")]
            )
            code = run_one(name, extra)
        except Exception as exc:  # one failing benchmark must not hide the others' figures
            print(f"bench {name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
        print(f"\n(bench {name}: {time.monotonic() - started:.0f} s, exit {code})", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
