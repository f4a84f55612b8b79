"""Identity: key files (0600, created once, refused when too open), ids, sign/verify."""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest

from grid_ipfs.identity import (
    Identity,
    IdentityError,
    b64url_decode,
    b64url_encode,
    default_key_path,
    is_public_id,
    parse_public_id,
    verify,
)


def test_sign_verify_round_trip():
    me = Identity.generate()
    sig = me.sign(b"hello")
    assert len(sig) == 64
    assert verify(me.id, b"hello", sig)
    assert not verify(me.id, b"hellO", sig)
    assert not verify(Identity.generate().id, b"hello", sig)


def test_id_is_unpadded_base64url_of_32_bytes():
    me = Identity.generate()
    assert len(me.id) == 43 and "=" not in me.id
    assert len(parse_public_id(me.id)) == 32
    assert is_public_id(me.id)


@pytest.mark.parametrize("bad_id", ["", "abc", "A" * 42 + "=", "A" * 44, "+" * 43, None, 42, b"A" * 43])
def test_verify_returns_false_on_malformed_ids(bad_id):
    sig = Identity.generate().sign(b"x")
    assert verify(bad_id, b"x", sig) is False
    assert not is_public_id(bad_id)


@pytest.mark.parametrize("bad_sig", [b"", b"\0" * 63, b"\0" * 65, "not bytes", None])
def test_verify_returns_false_on_malformed_signatures(bad_sig):
    assert verify(Identity.generate().id, b"x", bad_sig) is False


def test_non_canonical_id_spelling_is_refused():
    """One key, one id: a spelling with non-zero trailing bits decodes to the same bytes but is refused."""
    me = Identity.generate()
    last = me.id[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = me.id[:-1] + alphabet[alphabet.index(last) ^ 1]  # differs only in the unused low bits
    with pytest.raises(ValueError, match="canonical"):
        b64url_decode(twin)
    assert not verify(twin, b"x", me.sign(b"x"))


def test_b64url_round_trip():
    for n in range(10):
        raw = os.urandom(n)
        assert b64url_decode(b64url_encode(raw)) == raw


def test_load_or_create_makes_0600_key_and_reloads_it(tmp_path):
    path = tmp_path / "nested" / "dir" / "worker.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Identity.load_or_create(path)
    assert again.id == first.id
    assert verify(first.id, b"m", again.sign(b"m"))


def test_group_readable_key_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "client.key"
    Identity.load_or_create(path)
    os.chmod(path, 0o640)
    with pytest.raises(IdentityError) as info:
        Identity.load_or_create(path)
    assert str(path) in str(info.value) and "chmod 600" in str(info.value)


def test_garbage_key_file_is_refused(tmp_path):
    path = tmp_path / "bad.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(IdentityError, match="bad.key"):
        Identity.load_or_create(path)


def test_default_key_path_honours_grid_ipfs_home(monkeypatch, tmp_path):
    monkeypatch.setenv("GRID_IPFS_HOME", str(tmp_path))
    assert default_key_path("worker") == tmp_path / "worker.key"
    monkeypatch.delenv("GRID_IPFS_HOME")
    assert default_key_path("client").parts[-2:] == (".grid_ipfs", "client.key")


def _load_id(path, barrier, out):
    barrier.wait()  # start both processes together
    out.put(Identity.load_or_create(path).id)


def test_two_processes_starting_together_end_with_one_key(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    path = tmp_path / "shared.key"
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_load_id, args=(str(path), barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    ids = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert ids[0] == ids[1] == Identity.load_or_create(path).id


def test_id_list_reads_ids_and_names_a_bad_line(tmp_path):
    from grid_ipfs.identity import IdentityError, read_id_list

    a, b = Identity.generate().id, Identity.generate().id
    good = tmp_path / "ids.txt"
    good.write_text(f"# allowed workers\n{a}  # hospital a\n\n{b}\n")
    assert read_id_list(good) == {a, b}
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{a}\nnot-an-id\n")
    with pytest.raises(IdentityError, match="bad.txt:2: not a public id"):
        read_id_list(bad)


def test_an_id_beginning_with_a_dash_is_a_value_on_the_command_line():
    """One id in 64 starts with "-": `--signer -Ab...` would be an argparse error ("expected one
    argument") unless the CLI joins it to its option first."""
    import argparse

    from grid_ipfs.identity import id_options_joined

    dashed = next(i.id for i in iter(Identity.generate, None) if i.id.startswith("-"))
    argv = ["verify", "--signer", dashed, "HEAD", "--json", "--other", "-x"]
    assert id_options_joined(argv, ("--signer",)) == ["verify", f"--signer={dashed}", "HEAD", "--json", "--other", "-x"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--signer")
    assert parser.parse_args(id_options_joined(["--signer", dashed], ("--signer",))).signer == dashed
    with pytest.raises(argparse.ArgumentError, match="expected one argument"):
        parser.parse_args(["--signer", dashed])  # what users hit before
