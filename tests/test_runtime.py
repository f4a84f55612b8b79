"""The process-wide settings of `grid_ipfs.runtime`, each checked in a fresh interpreter: they change
the process they run in, which the test process must not become."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "TF_"))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_large_frees_go_back_to_the_kernel_unless_the_operator_chose_a_threshold():
    code = "from grid_ipfs.runtime import return_large_frees; print(return_large_frees())"
    assert _run(code) == "True"  # glibc here: mallopt accepted the setting
    assert _run(code, MALLOC_MMAP_THRESHOLD_="65536") == "False"


def test_prepare_owner_process_quiets_tensorflow_without_overriding_the_user():
    code = ("import os; from grid_ipfs.runtime import prepare_owner_process; prepare_owner_process(); "
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], os.environ['TF_ENABLE_ONEDNN_OPTS'])")
    assert _run(code) == "3 0"
    assert _run(code, TF_CPP_MIN_LOG_LEVEL="1") == "1 0"


def test_importing_grid_ipfs_sets_nothing():
    code = ("import os; import grid_ipfs, grid_ipfs.client, grid_ipfs.worker; "
            "print('TF_CPP_MIN_LOG_LEVEL' in os.environ)")
    assert _run(code) == "False"
