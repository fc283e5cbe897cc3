"""What the fuzz suites share: Hypothesis settings, and the tally of outcomes they report."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, settings

# Derandomized in CI (CI=true): the same cases every run, so a landing never depends on luck;
# elsewhere each run explores new ones.
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=os.environ.get("CI") == "true",
)

# How each case ended, for docs/reliability.md's figures: written, merged with what other
# suites wrote, to $LAZYFS_FUZZ_FIGURES when it is set.
OUTCOMES: Counter[str] = Counter()


def write_figures() -> None:
    path = os.environ.get("LAZYFS_FUZZ_FIGURES")
    if path:
        known = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        Path(path).write_text(json.dumps({**known, **OUTCOMES}, indent=1, sort_keys=True))
