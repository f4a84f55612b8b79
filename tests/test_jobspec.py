"""`JobSpec` validates itself when it is built: a spec that describes no job fails there, in one line
naming the field, not mid-job after its genesis block was written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from grid_ipfs.client import InvalidJobSpec, JobFailed, JobSpec
from tests.cli import run_cli

UNREACHABLE = "/ip4/127.0.0.1/tcp/9"


def test_paths_given_as_strings_are_paths():
    """The README's call: strings where paths go (`submit` reads `model_path.read_bytes()`)."""
    spec = JobSpec(model_path="model.keras", rounds=5, min_workers=3, eval_data="heldout.npz")
    assert spec.model_path == Path("model.keras") and spec.eval_data == Path("heldout.npz")
    assert isinstance(spec.model_path, Path) and isinstance(spec.eval_data, Path)
    assert JobSpec(model_path=None, rounds=1).eval_data is None


@pytest.mark.parametrize("fields, message", [
    ({"min_workers": 0}, "min_workers must be an integer in 1..1000000, got 0"),
    ({"rounds": 0}, "rounds must be an integer in 1..1000000, got 0"),
    ({"rounds": 10 ** 400}, "rounds must be an integer in 1..1000000, got 1000000000000000000000000000000000000..."),
    ({"epochs": True}, "epochs must be an integer in 1..1000000, got True"),
    ({"batch_size": 2.0}, "batch_size must be an integer in 1..1000000, got 2.0"),
    ({"max_retries": -1}, "max_retries must be an integer in 0..1000000, got -1"),
    ({"miners": -1}, "miners must be an integer in 0..1000000, got -1"),
    ({"max_examples": 0}, "max_examples must be an integer in 1..9007199254740992, got 0 (or None)"),
    ({"seed": "5"}, "seed must be an integer, got '5'"),
    ({"fraction": 0}, "fraction must be a finite number in (0, 1], got 0"),
    ({"fraction": 1.5}, "fraction must be a finite number in (0, 1], got 1.5"),
    ({"round_timeout": 0}, "round_timeout must be a finite number > 0, got 0"),
    ({"join_timeout": math.inf}, "join_timeout must be a finite number > 0, got inf"),
    ({"proposal_timeout": -1.0}, "proposal_timeout must be a finite number > 0, got -1.0"),
    ({"max_norm_ratio": math.nan}, "max_norm_ratio must be a finite number >= 0, got nan"),
    ({"proximal_mu": -0.1}, "proximal_mu must be a finite number >= 0, got -0.1"),
    ({"proximal_mu": 10 ** 400}, "proximal_mu must be a finite number >= 0, got 10000000000000000000000000000000000"),
    ({"job_id": "../x"}, "job_id must be 1-64 characters of [A-Za-z0-9_.-], got '../x'"),
    ({"aggregation": "fedsgd"}, "unknown aggregation 'fedsgd'; known: bulyan, dp-fedavg, fedadagrad, fedadam"),
    ({"aggregation": "dp-fedavg", "aggregation_params": {"clip": 1.0}}, "dp-fedavg needs the param(s) noise_mult"),
    ({"aggregation": "FedAdam", "aggregation_params": {"beta_1": 1.0}}, "fedadam: beta_1 must be a finite number"),
    ({"aggregation": "fedyogi", "miners": 1}, "fedyogi keeps server state across rounds"),
    ({"aggregation": "median", "aggregation_params": {"trim": 0.1}}, "median: unexpected param 'trim' (takes none)"),
    ({"aggregation": "trimmed-mean", "aggregation_params": {"trim": 0.5}}, "trimmed-mean: trim must be a finite"),
    ({"accept": "val_accuracy=0.6"}, "acceptance rule 'val_accuracy=0.6': expected METRIC>=NUMBER"),
    ({"aggregation": "secure-fedavg"}, "secure_aggregation goes with the secure-fedavg / secure-dp-fedavg rules"),
    ({"secure_aggregation": True}, "secure_aggregation goes with the secure-fedavg / secure-dp-fedavg rules"),
    ({"aggregation": "secure-fedavg", "secure_aggregation": True, "miners": 1}, "secure aggregation hides single"),
    ({"model_path": 3}, "model_path must be a path, got int"),
])
def test_a_spec_that_describes_no_job_fails_when_built(fields, message):
    with pytest.raises(InvalidJobSpec) as raised:
        JobSpec(**{"model_path": "m.keras", "rounds": 1, **fields})
    assert str(raised.value).startswith(f"job spec: {message}"), str(raised.value)
    assert "\n" not in str(raised.value)
    assert isinstance(raised.value, JobFailed) and isinstance(raised.value, ValueError)  # what callers catch


def test_every_setting_the_cli_can_give_is_accepted():
    spec = JobSpec(model_path="m.keras", rounds=3, min_workers=2, fraction=0.5, epochs=2, batch_size=16,
                   round_timeout=3, join_timeout=10.5, max_retries=0, max_norm_ratio=0, eval_data="e.npz",
                   job_id="digits-1", aggregation="dp-fedavg",
                   aggregation_params={"clip": 3.0, "noise_multiplier": 1.0, "seed": 5}, seed=5, proximal_mu=0.01,
                   accept="improves:val_loss", miners=2, proposal_timeout=5, max_examples=1000)
    assert spec.config()["aggregation_params"]["clip"] == 3.0
    JobSpec(model_path=None, rounds=1, aggregation="secure-dp-fedavg", secure_aggregation=True,
            aggregation_params={"clip": 3.0, "noise_multiplier": 0.05})


def test_resume_rebuilds_the_spec_from_its_config_and_checks_the_overrides():
    spec = JobSpec(model_path="m.keras", rounds=4, min_workers=2, aggregation="krum",
                   aggregation_params={"byzantine": 1}, accept="val_accuracy>=0.5", max_examples=100)
    again = JobSpec.from_config(spec.config(), job_id="j", eval_data="e.npz")
    assert again.config() == spec.config() and again.eval_data == Path("e.npz") and again.model_path is None
    with pytest.raises(InvalidJobSpec, match="^job spec: min_workers must be an integer in 1..1000000, got 0$"):
        JobSpec.from_config(spec.config(), min_workers=0)


def test_the_cli_prints_one_error_line_before_touching_the_daemon(tmp_path):
    """The daemon is unreachable: the spec's error comes first, so nothing was added or written."""
    proc = run_cli("grid_ipfs.client", "submit", "--api", UNREACHABLE, "--model", str(tmp_path / "m.keras"),
                   "--rounds", "1", "--round-timeout", "0", "--head-dir", str(tmp_path / "heads"), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: job spec: round_timeout must be a finite number > 0, got 0.0"]
    assert not (tmp_path / "heads").exists()


def test_a_flower_name_is_recorded_under_the_strategy_s_own_name():
    spec = JobSpec(model_path="m.keras", rounds=1, aggregation="FedMedian")
    assert spec.aggregation == "median" and spec.config()["aggregation"] == "median"
    assert type(spec.strategy).__name__ == "Median"
