"""Stopping a child process a benchmark started: a signal, a bounded wait, then SIGKILL."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop_process(
    process: subprocess.Popen[Any], timeout_s: float, stop_signal: int = signal.SIGTERM
) -> bool:
    """Send ``stop_signal`` to ``process`` if it still runs and wait up to ``timeout_s`` for it
    to exit; past that, SIGKILL it and reap it. True if it had to be killed."""
    if process.poll() is not None:
        return False
    process.send_signal(stop_signal)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return True
    return False
