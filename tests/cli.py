"""Run the project's command lines the way a user does: a separate process, text output captured."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ARGS...` to completion (killed after `timeout`) with stdout a pipe, not a terminal;
    `env` adds to the current environment."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
