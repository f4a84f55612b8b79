"""House rules that a change can break without any feature failing: importing grid_ipfs changes no
global (the environment above all), and a lower layer never imports a higher one."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "grid_ipfs"

LAYERS = {
    "ipfs": 0, "errors": 0, "limits": 0, "text": 0, "multibase": 0,
    "payloads": 1, "messages": 1, "identity": 1, "chain": 1, "vetting": 1, "kerasstate": 1,
    "aggregate": 2, "secagg": 2, "strategies": 2,
}
"""Layer of each top-level module or package that has one: transport 0, formats 1, pure math 2. Roles and
CLIs (worker, client, miner, any `__main__`) may import all of them."""
ALLOWED_UP = {("chain/verify.py", "strategies"), ("chain/verify.py", "aggregate")}
"""chain verify is an auditor: it recomputes aggregates, so it asks the strategies (lazily, inside the
recompute) and re-applies acceptance rules; the block format, the log and the walk never do."""


def _imported_modules(path: Path) -> set[str]:
    """Top-level grid_ipfs modules that `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(PACKAGE).parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(parts[: len(parts) - node.level + 1])
            target = base + (node.module.split(".") if node.module else [])
            if target:
                found.add(target[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("grid_ipfs."):
            found.add(node.module.split(".")[1])
    return found


def test_lower_layers_never_import_higher_ones():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        own = rel.split("/")[0].removesuffix(".py")
        if own not in LAYERS or path.name == "__main__.py":
            continue
        for imported in _imported_modules(path) - {own}:
            if imported in LAYERS and LAYERS[imported] <= LAYERS[own]:
                continue
            if (rel, imported) not in ALLOWED_UP:
                offences.append(f"{rel} imports {imported}")
    assert offences == []


def _module_level_environ_writes(path: Path) -> list[int]:
    """Lines of `path` that write os.environ outside any function (i.e. when the module is imported)."""
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node))
    lines = []
    for node in ast.walk(tree):
        if id(node) in inside:
            continue
        text = ast.unparse(node) if isinstance(node, (ast.Assign, ast.Expr, ast.Delete, ast.AugAssign)) else ""
        if "os.environ" in text and any(w in text for w in ("setdefault", "update", "pop", "=", "del ")):
            lines.append(node.lineno)
    return lines


def test_no_module_writes_the_environment_when_imported():
    offences = {p.relative_to(PACKAGE).as_posix(): lines for p in sorted(PACKAGE.rglob("*.py"))
                if (lines := _module_level_environ_writes(p))}
    assert offences == {}


def test_importing_the_light_modules_changes_no_variable_and_loads_no_tensorflow():
    """The modules that do not load Keras, imported in a clean process: the environment is unchanged
    (TensorFlow itself sets variables when it loads; the modules that need it load it lazily)."""
    modules = ["grid_ipfs", "grid_ipfs.ipfs", "grid_ipfs.chain", "grid_ipfs.strategies", "grid_ipfs.client",
               "grid_ipfs.client.__main__", "grid_ipfs.worker", "grid_ipfs.miner", "grid_ipfs.chain.__main__",
               "grid_ipfs.demo", "grid_ipfs.privacy"]
    script = ("import importlib, json, os, sys\nbefore = dict(os.environ)\n"
              f"for name in {modules!r}:\n    importlib.import_module(name)\n"
              "print(json.dumps([{k: v for k, v in os.environ.items() if before.get(k) != v},"
              " 'tensorflow' in sys.modules]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [{}, False]



def test_the_benchmark_probe_wraps_a_name_the_client_calls():
    """benchmarks/probe.py times the client's aggregation by replacing `grid_ipfs.client.core.run`
    (the profiled steps' names are checked in tests/test_benchmarks.py)."""
    import inspect

    from grid_ipfs.client import core

    assert callable(core.run) and "run(job.strategy" in inspect.getsource(core.Client._aggregate)
