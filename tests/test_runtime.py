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


ROUND_LEFTOVERS = """
import gc, sys, weakref
import numpy as np
from grid_ipfs import runtime
from grid_ipfs.ipfs import parse_cid
from multiformats import CID, multihash
cid = str(CID("base32", 1, "raw", multihash.digest(b"x", "sha2-256")))
gc.collect()
gc.disable()  # only the collections the test makes

def a_round():
    running_sum = np.zeros(1 << 20)  # a round's model-sized local
    parse_cid(cid)  # typing_validation leaves a cycle that holds this frame
    return weakref.ref(running_sum)

if sys.argv[1] == "entry-point":
    runtime.collect_cycles_between_rounds()  # what the client's CLI does
left = a_round()
runtime.between_rounds()
print(left() is not None, gc.get_freeze_count() > 0)
"""


def test_the_owner_s_entry_point_frees_what_a_round_left_in_reference_cycles():
    """A CID parse leaves a reference cycle (typing_validation keeps failed union members' errors, with
    their frames) that keeps the caller's frames, and their model-sized locals, alive until Python's
    rare full collection. After `collect_cycles_between_rounds()`, `between_rounds()` collects them (and freezes
    the heap, so later collections are cheap); a library user's process is left to Python's schedule."""
    run = lambda mode: subprocess.run([sys.executable, "-c", ROUND_LEFTOVERS, mode], capture_output=True,
                                      text=True, timeout=120)
    library, entry_point = run("library"), run("entry-point")
    assert library.returncode == 0 and entry_point.returncode == 0, library.stderr + entry_point.stderr
    assert library.stdout.split() == ["True", "False"]  # the leftover: why the entry point collects
    assert entry_point.stdout.split() == ["False", "True"]
