"""The examples run as a user runs them (`python examples/NAME.py ...`) and print what they promise.

Each example is a subprocess in its own process group with `--dir` under tmp_path. Whatever happens,
the group gets SIGINT (the example's `with` blocks stop its workers and daemons), then SIGKILL if it
lingers, and `Devnet.down` stops any daemon still recorded or running under tmp_path.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from grid_ipfs import data
from grid_ipfs.ipfs.devnet import Devnet

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


def run_example(name: str, *args: str, workdir: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run examples/NAME (its `--dir` is `workdir`) to completion, then make sure nothing of it is left."""
    command = [sys.executable, str(EXAMPLES / name), *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # KeyboardInterrupt: the example's with-blocks stop everything
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        pytest.fail(f"{name} {' '.join(args)} did not finish within {timeout}s\n{stdout}\n{stderr}\n"
                    f"{worker_logs(workdir)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for devnet_dir in (workdir / "devnet", workdir / "grid" / "devnet"):
            Devnet.down(devnet_dir)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def worker_logs(workdir: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                     for log in sorted((workdir / "grid" / "logs").glob("*.log")))


def explain(result: subprocess.CompletedProcess, workdir: Path) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{worker_logs(workdir)}"


def test_xor_model_shared_by_cid_predicts_all_four_points(tmp_path):
    result = run_example("xor.py", "--dir", str(tmp_path), workdir=tmp_path, timeout=180)
    assert result.returncode == 0, explain(result, tmp_path)
    assert re.search(r"alice added the model to node 0: (Qm\w{44}|b\w{50,})", result.stdout), result.stdout
    assert re.search(r"bob fetched \d+ bytes from node 1", result.stdout), result.stdout
    predictions = re.findall(r"(\d) xor (\d) -> ([\d.]+)", result.stdout)
    assert len(predictions) == 4, result.stdout
    for a, b, p in predictions:
        assert round(float(p)) == int(a) ^ int(b), result.stdout
    assert "predictions: 4/4 correct" in result.stdout


def test_diabetes_two_rounds_print_finite_falling_mse_and_a_verified_chain(tmp_path):
    result = run_example("diabetes.py", "--rounds", "2", "--dir", str(tmp_path), workdir=tmp_path, timeout=300)
    assert result.returncode == 0, explain(result, tmp_path)
    initial = float(re.search(r"initial model: held-out MSE ([\d.]+)", result.stdout).group(1))
    rounds = re.findall(r"round (\d+): 5 updates, train MSE ([\d.naif]+) MAE [\d.naif]+, "
                        r"held-out MSE ([\d.naif]+) MAE ([\d.naif]+)", result.stdout)
    assert [int(r[0]) for r in rounds] == [1, 2], result.stdout
    mse = [float(r[2]) for r in rounds]
    assert all(math.isfinite(float(v)) for r in rounds for v in r[1:]), result.stdout
    assert mse[0] < initial and mse[1] < initial, (initial, mse)
    assert mse[1] <= mse[0] + 0.05, mse
    head = re.search(r"chain head: (bafy\w+)", result.stdout)
    assert head, result.stdout
    assert f"head {head.group(1)}" in result.stdout  # the last round's block is the head
    assert "chain verified from node 2: True (3 blocks)" in result.stdout


def test_diabetes_custom_block_records_the_line_per_round_and_its_check_catches_a_forgery(tmp_path):
    result = run_example("diabetes_custom_block.py", "--rounds", "2", "--dir", str(tmp_path), workdir=tmp_path,
                         timeout=300)
    assert result.returncode == 0, explain(result, tmp_path)
    held_out = dict(re.findall(r"round (\d+): 3 updates, .*held-out MSE ([\d.]+) MAE", result.stdout))
    number = r"[+-]\d+\.\d{3}"
    recorded = re.findall(rf"  round (\d+): intercept ({number}) coef \[((?:{number} ?){{10}})\] "
                          r"held-out MSE ([\d.]+)\n", result.stdout)
    assert [r[0] for r in recorded] == ["1", "2"], result.stdout
    assert all(math.isfinite(float(c)) for r in recorded for c in r[2].split()), result.stdout
    assert recorded[0][2] != recorded[1][2], result.stdout  # the line moved between rounds
    assert {r[0]: r[3] for r in recorded} == held_out, result.stdout  # the custom field is the client's evaluation
    assert re.search(rf"sklearn least squares on all 354 patients: intercept {number} coef \[", result.stdout)
    assert "chain verified from node 2 with the linreg check: True (3 blocks)" in result.stdout
    assert re.search(r"re-signed by the owner \(bafy\w+\): plain verify True, with the linreg check False: "
                     r"block 2 \(seq 2\): ext: coef\[0\] is 0\.0, but the block's weights give -?\d", result.stdout), \
        result.stdout


def fashion_mnist_installed() -> bool:
    root = Path(data.FASHION_MNIST_ROOT)
    return all((root / f"{name}.gz").is_file() or (root / name).is_file() for name in FASHION_FILES)


def test_fashion_mnist_runs_when_installed_and_says_how_to_install_it_otherwise(tmp_path):
    if fashion_mnist_installed():
        result = run_example("fashion_mnist.py", "--rounds", "1", "--workers", "2", "--limit", "100",
                             "--dir", str(tmp_path), workdir=tmp_path, timeout=240)
        assert result.returncode == 0, explain(result, tmp_path)
        assert re.search(r"round 1: 2 updates, .*held-out loss [\d.]+ accuracy [\d.]+", result.stdout), result.stdout
        assert re.search(r"chain head: bafy\w+", result.stdout), result.stdout
        assert "chain verified from node 1: True (2 blocks)" in result.stdout
    else:
        result = run_example("fashion_mnist.py", "--dir", str(tmp_path), workdir=tmp_path, timeout=60)
        assert result.returncode != 0, explain(result, tmp_path)
        assert "sudo apt-get install dataset-fashion-mnist" in result.stderr, explain(result, tmp_path)
        assert not (tmp_path / "grid").exists()  # it stopped before starting anything
