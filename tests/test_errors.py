"""One exception root: every error grid_ipfs raises on purpose is a `GridError`, and keeps its old base."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import grid_ipfs
from grid_ipfs import GridError


def _public_exceptions() -> dict[str, type]:
    """Every public exception class defined in a grid_ipfs module (private `_Bad` helpers never escape)."""
    found = {}
    for info in pkgutil.walk_packages(grid_ipfs.__path__, "grid_ipfs."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, BaseException) and not name.startswith("_")
                    and value.__module__ == module.__name__):
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_public_exception_of_grid_ipfs_is_a_grid_error():
    found = _public_exceptions()
    assert len(found) >= 15, sorted(found)  # the walk found the families (IPFS, messages, chain, ...)
    strays = sorted(name for name, cls in found.items() if not issubclass(cls, GridError))
    assert not strays, f"not under GridError: {strays}"


@pytest.mark.parametrize("path, builtin", [
    ("grid_ipfs.messages.MessageError", ValueError),
    ("grid_ipfs.payloads.PayloadError", ValueError),
    ("grid_ipfs.data.DataError", ValueError),
    ("grid_ipfs.client.job.JobFailed", RuntimeError),
    ("grid_ipfs.ipfs.devnet.DevnetError", RuntimeError),
    ("grid_ipfs.ipfs.car.CarError", ValueError),
])
def test_the_families_keep_their_builtin_bases(path, builtin):
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, GridError) and issubclass(cls, builtin)


def test_one_clause_catches_a_transport_error_and_a_peer_message_error():
    from grid_ipfs import messages
    from grid_ipfs.ipfs.rpc import IPFSClient

    caught = []
    for attempt in (lambda: messages.decode(b"{}"), lambda: IPFSClient("/ip4/127.0.0.1/tcp/9").id()):
        try:
            attempt()
        except GridError as exc:
            caught.append(type(exc).__name__)
    assert caught == ["MessageError", "DaemonUnreachable"]
