"""Shared fixtures. Integration tests run against real loopback daemons from grid_ipfs.devnet.

A devnet that cannot start makes the tests that need it fail with the devnet's own reason; nothing
here skips. Every daemon a fixture starts is stopped by PID when the fixture ends, pass or fail.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from grid_ipfs.ipfs.devnet import Devnet  # noqa: E402

# Fuzz budgets (tests/test_fuzz.py): `make test` uses "ci", seconds per target; `make fuzz` uses "fuzz".
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=False)
settings.register_profile("fuzz", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def devnet(tmp_path_factory):
    """Three connected daemons shared by the whole session (do not stop or restart them in a test)."""
    net = Devnet.up(3, tmp_path_factory.mktemp("devnet"))
    try:
        yield net
    finally:
        net.stop()


@pytest.fixture
def make_devnet(tmp_path):
    """Factory for a private devnet a test may break (kill and restart nodes); stopped at teardown."""
    started: list[Devnet] = []

    def make(n: int = 2) -> Devnet:
        net = Devnet.up(n, tmp_path / f"devnet{len(started)}")
        started.append(net)
        return net

    yield make
    for net in started:
        net.stop()


@pytest.fixture(scope="session")
def flwr_python() -> str:
    """An interpreter with flwr (benchmarks/.venv-flwr, created with pip on first use): Flower is the
    reference of tests/test_flower_parity.py but is never installed into .venv (it would downgrade
    protobuf, rich and packaging). Fails with the reason, never skips, when it cannot be made."""
    import subprocess

    from benchmarks.flower import flwr_python as find_or_create

    try:
        return find_or_create({})
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"no Python with flwr for the Flower parity tests: {exc}")


@pytest.fixture
def clients(devnet):
    """One RPC client per node of the session devnet."""
    opened = [node.client() for node in devnet.nodes]
    yield opened
    for client in opened:
        client.close()
