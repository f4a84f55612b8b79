"""Beyond FedAvg: robust rules against a Byzantine worker, DP-FedAvg, FedProx, acceptance rules.

Unit tests first (FedProx in `training.fit`, chains with dp-fedavg and acceptance rules verified from an
in-memory store, command-line parsing); then integration tests on one module-scoped grid of real
daemons: 5 workers (4 honest, 1 sending poisoned weights via `tests/byzantine_worker.py`) run several
jobs with distinct ids, and every chain they write is audited with `chain verify`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from grid_ipfs import data, zoo  # noqa: E402
from grid_ipfs.aggregate import update_norm  # noqa: E402
from grid_ipfs.chain import ChainLog, read_head, verify_chain, walk  # noqa: E402
from grid_ipfs.identity import Identity  # noqa: E402
from grid_ipfs.localgrid import LocalGrid  # noqa: E402
from grid_ipfs.payloads import weights_to_bytes  # noqa: E402
from grid_ipfs.strategies import aggregate  # noqa: E402

from .byzantine_worker import parse_attack  # noqa: E402
from .cli import run_cli  # noqa: E402
from .test_chain_format import MemoryStore, signed_update  # noqa: E402
from .waiting import wait_for  # noqa: E402

OWNER = Identity.generate()
WORKERS = sorted((Identity.generate() for _ in range(3)), key=lambda i: i.id)
DP = {"clip": 0.5, "noise_multiplier": 1.0, "seed": 11}


# -- FedProx ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_small():
    x, y, x_test, y_test = data.digits()
    return x[:300], y[:300], x_test, y_test


def test_fedprox_keeps_local_weights_closer_to_the_global_ones(digits_small):
    from grid_ipfs.payloads import model_from_bytes, model_to_bytes
    from grid_ipfs.training import fit

    x, y, _, _ = digits_small
    blob = model_to_bytes(zoo.digits_mlp(seed=0))
    model = model_from_bytes(blob)
    start = [w.copy() for w in model.get_weights()]
    distance = {}
    for mu in (0.0, 0.1, 10.0):
        weights, metrics = fit(model, start, x, y, epochs=2, seed=1, proximal_mu=mu)
        distance[mu] = update_norm(weights, start)
    assert distance[10.0] < 0.2 * distance[0.0], distance
    assert distance[10.0] < distance[0.1] < distance[0.0], distance
    # mu goes back to 0 after a fit: a plain fit on this model equals one on a model that never saw FedProx
    again, _ = fit(model, start, x, y, epochs=2, seed=1)
    fresh, _ = fit(model_from_bytes(blob), start, x, y, epochs=2, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(again, fresh))
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="proximal_mu"):
            fit(model, start, x, y, proximal_mu=bad)


def test_fedprox_gradient_is_mu_times_the_distance():
    """One SGD step on a model whose own loss has zero gradient moves w by exactly -lr * mu * (w - w0)."""
    import keras

    from grid_ipfs.training import fit

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = np.zeros((4, 3), np.float32), np.zeros((4, 1), np.float32)  # zero inputs: the mse gradient is 0
    w0 = [np.array([[1.0], [2.0], [-1.0]], np.float32)]
    # fit anchors the term at its starting weights, where both the term and its gradient are 0
    out, metrics = fit(model, w0, x, y, epochs=1, batch_size=4, proximal_mu=5.0)
    np.testing.assert_array_equal(out[0], w0[0])
    assert metrics["loss"] == 0.0
    # one step from w0 + 1 with the anchor still at w0 (what fit does, minus re-anchoring):
    # w <- w - lr * mu * (w - w0) = (w0 + 1) - 0.1 * 5 * 1, and the loss is mu/2 * ||1||^2 = 7.5
    from grid_ipfs.training import _PROXIMAL

    proximal = _PROXIMAL[model]
    model.set_weights([w0[0] + 1.0])
    proximal.mu.assign(5.0)
    history = model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    proximal.stop()
    np.testing.assert_allclose(model.get_weights()[0], w0[0] + 0.5, rtol=1e-6)
    assert history.history["loss"][0] == pytest.approx(7.5)


def test_worker_reads_and_checks_proximal_mu_from_the_job_config():
    from grid_ipfs.worker import proximal_mu

    assert proximal_mu({"epochs": 1}) == 0.0 and proximal_mu({"proximal_mu": 0.01}) == 0.01
    for bad in (-0.1, "0.1", True, float("inf")):
        with pytest.raises(ValueError, match="proximal_mu"):
            proximal_mu({"proximal_mu": bad})


# -- command lines ---------------------------------------------------------------------------------------


def test_byzantine_attack_parsing():
    assert parse_attack("scale:20") == ("scale", 20.0) and parse_attack("scale:-5") == ("scale", -5.0)
    assert parse_attack("random") == ("random", 0.0)
    for bad in ("scale", "scale:x", "random:2", "flip"):
        with pytest.raises(ValueError, match="--attack"):
            parse_attack(bad)


def test_client_options_for_dp_and_accept():
    from grid_ipfs.client.__main__ import _accept_rule, _aggregation_options

    def opts(**kw):
        base = dict(aggregation=None, dp_clip=None, dp_noise=None, trim=None, byzantine=None, seed=3,
                    secure_aggregation=False, param=None)
        return argparse.Namespace(**{**base, **kw})

    assert _aggregation_options(opts()) == ("fedavg", {})
    assert _aggregation_options(opts(aggregation="krum", byzantine=1)) == ("krum", {"byzantine": 1})
    assert _aggregation_options(opts(dp_clip=1.0, dp_noise=0.5)) == (
        "dp-fedavg", {"clip": 1.0, "noise_multiplier": 0.5, "seed": 3})
    for bad in (dict(dp_clip=1.0), dict(aggregation="median", dp_clip=1.0, dp_noise=1.0),
                dict(aggregation="dp-fedavg"), dict(dp_clip=0.0, dp_noise=1.0), dict(dp_clip=1.0, dp_noise=-1.0)):
        with pytest.raises(ValueError):
            _aggregation_options(opts(**bad))
    assert _aggregation_options(opts(secure_aggregation=True)) == ("secure-fedavg", {})
    assert _aggregation_options(opts(secure_aggregation=True, dp_clip=1.0, dp_noise=0.5)) == (
        "secure-dp-fedavg", {"clip": 1.0, "noise_multiplier": 0.5})
    with pytest.raises(ValueError, match="--dp-clip must be > 0"):
        _aggregation_options(opts(secure_aggregation=True, dp_clip=0.0, dp_noise=0.5))
    for bad in (dict(aggregation="median"), dict(aggregation="dp-fedavg"), dict(trim=0.1)):
        with pytest.raises(ValueError, match="--secure-aggregation"):
            _aggregation_options(opts(secure_aggregation=True, **bad))
    assert _aggregation_options(opts(aggregation="FedAdam", param=["eta=0.05", "tau=1e-3"])) == (
        "fedadam", {"eta": 0.05, "tau": 0.001})
    for bad, message in ((["eta"], "expected NAME=NUMBER"), (["eta=fast"], "'fast' is not a number"),
                         (["eta=1", "eta=2"], "given twice"), (["lr=0.1"], "fedadam: unexpected param 'lr'")):
        with pytest.raises(ValueError, match=message):
            _aggregation_options(opts(aggregation="fedadam", param=bad))
    assert _accept_rule(" val_accuracy >= 0.60 ") == "val_accuracy>=0.6"
    with pytest.raises(argparse.ArgumentTypeError, match="acceptance rule"):
        _accept_rule("val_accuracy=0.6")


def test_client_cli_refuses_bad_beyond_options_as_usage_errors(tmp_path):
    for extra in (["--dp-clip", "1"], ["--accept", "accuracy!0.5"], ["--aggregation", "krum", "--dp-noise", "1"]):
        proc = subprocess.run([sys.executable, "-m", "grid_ipfs.client", "submit", "--api", "/ip4/127.0.0.1/tcp/9",
                               "--model", str(tmp_path / "m.keras"), "--rounds", "1", *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr


# -- chains with dp-fedavg and acceptance rules, verified from memory ------------------------------------


def _weights(rng) -> list[np.ndarray]:
    return [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]


def build_chain(store, tries: list[dict], *, rule: str | None = "val_accuracy>=0.5", params: dict | None = None,
                name: str = "dp-fedavg"):
    """Write a chain the way the client does: genesis, then one block per try. Each try is a dict with
    `round` and `val_accuracy`, and optionally tampering: `accepted` (override the verdict), `seq_shift`
    (noise seeded with another seq), `reference: "previous"` (delta from the previous block, even a
    rejected one). Returns (log, cids, {weights bytes: metrics}) for a fake evaluator."""
    from grid_ipfs.aggregate import parse_accept

    params = dict(DP if params is None else params)
    rng = np.random.default_rng(0)
    log = ChainLog(store, None)
    start = _weights(rng)
    evaluations = {}
    genesis_metrics = {"val_accuracy": 0.1}
    evaluations[weights_to_bytes(start)] = genesis_metrics
    cids = [log.append({"job": "beyond", "round": 0, "model": store.add(b"a .keras file"),
                        "weights": store.add(weights_to_bytes(start)),
                        "aggregation": {"name": "init", "params": {}}, "updates": [], "metrics": genesis_metrics},
                       OWNER)]
    model = store.add(b"a .keras file")
    accepted_weights, previous_weights = start, start
    base = store.add(weights_to_bytes(start))  # what the round announces: the last accepted global weights
    for seq, spec in enumerate(tries, start=1):
        results = [(_weights(rng), int(rng.integers(10, 100))) for _ in WORKERS]
        reference = previous_weights if spec.get("reference") == "previous" else accepted_weights
        new = aggregate(name, results, reference=reference, round=spec["round"], seq=seq + spec.get("seq_shift", 0),
                        **params)
        metrics = {"val_accuracy": spec["val_accuracy"], "loss": 1.0}
        block_params = dict(params)
        if rule is not None:
            ok, _ = parse_accept(rule).check(metrics)
            metrics["accepted"] = spec.get("accepted", 1.0 if ok else 0.0)
            block_params["accept"] = rule
        evaluations[weights_to_bytes(new)] = metrics
        updates = []
        for w, (u, n) in zip(WORKERS, results):
            weights = store.add(weights_to_bytes(u))
            updates.append({"worker": w.id, "weights": weights, "num_examples": n, "metrics": {},
                            "message": signed_update(store, w, job="beyond", round_=spec["round"], head=log.head,
                                                     base=base, weights=weights, num_examples=n, metrics={})})
        cids.append(log.append({
            "job": "beyond", "round": spec["round"], "model": model,
            "weights": store.add(weights_to_bytes(new)), "aggregation": {"name": name, "params": block_params},
            "updates": updates, "metrics": metrics}, OWNER))
        previous_weights = new
        if metrics.get("accepted", 1.0) != 0.0:
            accepted_weights, base = new, store.add(weights_to_bytes(new))
    return log, cids, evaluations


def fake_evaluator(evaluations: dict, shift: float = 0.0):
    def evaluate(weights):
        found = evaluations[weights_to_bytes(weights)]
        return {"val_accuracy": found["val_accuracy"] + shift}
    return evaluate


HAPPY = [{"round": 1, "val_accuracy": 0.3}, {"round": 1, "val_accuracy": 0.7}, {"round": 2, "val_accuracy": 0.8}]


def test_dp_chain_with_a_rejected_try_verifies_bit_for_bit():
    store = MemoryStore()
    log, cids, evaluations = build_chain(store, HAPPY)
    report = verify_chain(store, log.head)
    assert report.ok, report.reason
    blocks = [b for _, b in walk(store, log.head)][::-1]
    assert [(b["round"], b["metrics"].get("accepted")) for b in blocks] == [(0, None), (1, 0.0), (1, 1.0), (2, 1.0)]
    assert blocks[1]["aggregation"]["params"] == {**DP, "accept": "val_accuracy>=0.5"}
    # with the eval data (here: a fake evaluator that knows the right numbers) the metrics are re-checked
    assert verify_chain(store, log.head, evaluate=fake_evaluator(evaluations)).ok


@pytest.mark.parametrize("tamper, reason", [
    ({"seq_shift": 1}, "weights differ from dp-fedavg"),
    ({"reference": "previous"}, "weights differ from dp-fedavg"),  # delta taken from the rejected candidate
    ({"accepted": 1.0, "val_accuracy": 0.4, "round": 1}, "recorded as accepted, but val_accuracy 0.4 fails"),
    ({"accepted": 0.0}, "recorded as rejected, but val_accuracy 0.7 meets"),
    ({"round": 2}, "round 2 follows a rejected try of round 1"),
])
def test_verify_names_a_tampered_dp_or_acceptance_block(tamper, reason):
    store = MemoryStore()
    tries = [dict(t) for t in HAPPY]
    tries[1].update(tamper)
    log, cids, _ = build_chain(store, tries)
    report = verify_chain(store, log.head)
    assert not report.ok
    assert report.first_bad == cids[2] and reason in report.reason, report.reason


def test_verify_with_eval_data_rechecks_the_recorded_metrics():
    store = MemoryStore()
    log, cids, evaluations = build_chain(store, HAPPY)
    report = verify_chain(store, log.head, evaluate=fake_evaluator(evaluations, shift=0.01))
    assert not report.ok and report.first_bad == cids[0]
    assert "recorded val_accuracy 0.1, but the verifier's evaluation gives 0.11" in report.reason


def test_improves_rule_compares_with_the_last_accepted_block():
    store = MemoryStore()
    tries = [{"round": 1, "val_accuracy": 0.5}, {"round": 2, "val_accuracy": 0.4, "accepted": 0.0},
             {"round": 2, "val_accuracy": 0.45, "accepted": 0.0}, {"round": 2, "val_accuracy": 0.6}]
    log, _, _ = build_chain(store, tries, rule="improves:val_accuracy", params={}, name="fedavg")
    assert verify_chain(store, log.head).ok  # 0.45 > 0.4 but not > 0.5, the last accepted: rightly rejected
    tries[2]["accepted"] = 1.0
    log, cids, _ = build_chain(MemoryStore(), tries, rule="improves:val_accuracy", params={}, name="fedavg")
    report = verify_chain(log.store, log.head)
    assert not report.ok and report.first_bad == cids[3] and "0.45 vs 0.5" in report.reason, report.reason


# -- on real daemons: one grid, 4 honest workers and 1 Byzantine -----------------------------------------

HONEST, ATTACK = 4, "scale:20"


class ByzantineGrid(LocalGrid):
    """A LocalGrid whose worker number `byzantine` runs `python -m tests.byzantine_worker --attack ATTACK`."""

    def __init__(self, *args, byzantine: int, attack: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.byzantine, self.attack = byzantine, attack

    def worker_command(self, i, extra_args=None):
        command = super().worker_command(i, extra_args)
        if i == self.byzantine:
            command[command.index("grid_ipfs.worker")] = "tests.byzantine_worker"
            command += ["--attack", self.attack]
        return command


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("beyond")
    x, y, x_test, y_test = data.digits()
    shards = data.write_shards(root / "shards", data.split_iid(x, y, HONEST + 1, seed=1))
    data.save_shard(root / "test.npz", x_test, y_test)
    zoo.digits_mlp(seed=0).save(root / "digits.keras")
    local = ByzantineGrid(root / "grid", shards, nodes=3, byzantine=HONEST, attack=ATTACK)
    local.start()
    try:
        for i in range(HONEST + 1):
            wait_for(lambda i=i: "listening on" in local.worker_log(i), timeout=120, what=f"worker{i} to listen")
        honest = {Identity.load_or_create(local.directory / "keys" / f"worker{i}.key").id for i in range(HONEST)}
        (root / "honest.txt").write_text("".join(f"{w}\n" for w in sorted(honest)))
        yield SimpleNamespace(local=local, root=root, honest=honest, owner_key=root / "owner.key",
                              owner=Identity.load_or_create(root / "owner.key"))
    finally:
        local.stop()


def run_job(grid, allowed=None, **spec):
    from grid_ipfs.client import Client, JobSpec

    spec = JobSpec(**{"model_path": grid.root / "digits.keras", "eval_data": grid.root / "test.npz",
                      "round_timeout": 60, "join_timeout": 120, "max_retries": 1, "epochs": 1, **spec})
    with grid.local.client(0) as ipfs:
        return Client(ipfs, grid.owner, head_dir=grid.root / "heads", allowed_workers=allowed).submit(spec)



def logs(grid) -> str:
    return "\n".join(f"--- worker{i}\n{grid.local.worker_log(i)[-3000:]}" for i in range(HONEST + 1))


@pytest.fixture(scope="module")
def attacked(grid):
    """The same 4-round job (2 local epochs) under the same attack with three rules; the client's norm
    screen is off, so the rule alone has to cope."""
    results = {}
    for rule, params in (("fedavg", {}), ("median", {}), ("krum", {"byzantine": 1})):
        results[rule] = run_job(grid, rounds=4, epochs=2, min_workers=HONEST + 1, max_norm_ratio=0.0,
                                aggregation=rule, aggregation_params=params, job_id=f"byzantine-{rule}")
    print("\nheld-out accuracy per round under " + ATTACK + ": " + "; ".join(
        f"{rule} {[round(r.metrics['val_accuracy'], 3) for r in result.rounds]}" for rule, result in results.items()))
    return results


@pytest.mark.integration
def test_median_and_krum_keep_accuracy_where_fedavg_loses_it(grid, attacked):
    final = {rule: result.rounds[-1].metrics["val_accuracy"] for rule, result in attacked.items()}
    assert all(r.updates == HONEST + 1 for result in attacked.values() for r in result.rounds), logs(grid)
    assert "job byzantine-fedavg round 1" in grid.local.worker_log(HONEST)  # the attacker took part
    assert final["median"] >= 0.85 and final["krum"] >= 0.85, final
    assert final["fedavg"] <= min(final["median"], final["krum"]) - 0.3, final


@pytest.mark.integration
def test_robust_chains_verify_from_another_node(grid, attacked):
    for rule in ("median", "krum"):
        proc = run_cli("grid_ipfs.chain", "verify", "--api", grid.local.apis[2], attacked[rule].head)
        assert proc.returncode == 0 and "OK: 5 blocks verified" in proc.stdout, proc.stdout + proc.stderr
    with grid.local.client(1) as reader:
        head = [b for _, b in walk(reader, attacked["krum"].head)][0]
        assert head["aggregation"] == {"name": "krum", "params": {"byzantine": 1}}


@pytest.mark.integration
def test_dp_fedavg_chains_verify_and_accuracy_falls_as_noise_grows(grid):
    accuracy, heads = {}, {}
    for z in (0.0, 1.0):
        result = run_job(grid, allowed=grid.honest, rounds=3, min_workers=HONEST, aggregation="dp-fedavg",
                         aggregation_params={"clip": 3.0, "noise_multiplier": z, "seed": 5}, job_id=f"dp-z{z:g}")
        accuracy[z], heads[z] = result.rounds[-1].metrics["val_accuracy"], result.head
    print(f"\ndp-fedavg (clip 3, 4 workers, 3 rounds) held-out accuracy by noise multiplier: {accuracy}")
    assert accuracy[0.0] >= 0.8, accuracy
    assert accuracy[1.0] <= accuracy[0.0] - 0.3, accuracy
    with grid.local.client(2) as reader:
        for z, head in heads.items():
            report = verify_chain(reader, head, signer=grid.owner.id)
            assert report.ok, (z, report.reason)
            block = [b for _, b in walk(reader, head)][0]
            assert block["aggregation"] == {"name": "dp-fedavg",
                                            "params": {"clip": 3.0, "noise_multiplier": z, "seed": 5}}
    proc = run_cli("grid_ipfs.chain", "verify", "--api", grid.local.apis[1], heads[1.0])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.integration
def test_an_impossible_acceptance_rule_fails_the_job_plainly_after_bounded_retries(grid):
    heads = grid.root / "heads"
    proc = run_cli("grid_ipfs.client", "submit", "--api", grid.local.apis[0],
                   "--model", str(grid.root / "digits.keras"), "--rounds", "2", "--min-workers", str(HONEST),
                   "--eval-data", str(grid.root / "test.npz"),
                   "--accept", "val_accuracy>=1.01", "--accept-retries", "1", "--round-timeout", "60",
                   "--allow-workers", str(grid.root / "honest.txt"), "--key", str(grid.owner_key),
                   "--head-dir", str(heads), "--job", "accept-impossible", "--json")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert lines[-1].startswith("error: round 1 of job accept-impossible: every aggregate failed the acceptance "
                                "rule val_accuracy>=1.01 (2 tries; last: val_accuracy 0."), lines[-1]
    assert "Traceback" not in proc.stderr
    with grid.local.client(2) as reader:
        head = read_head(heads / "accept-impossible.head")
        blocks = [b for _, b in walk(reader, head)][::-1]
        assert [b["round"] for b in blocks] == [0, 1, 1]  # genesis, then two rejected tries of round 1
        assert [b["metrics"].get("accepted") for b in blocks] == [None, 0.0, 0.0]
        assert all(b["aggregation"]["params"] == {"accept": "val_accuracy>=1.01"} for b in blocks[1:])
        assert blocks[1]["metrics"]["attempts"] < blocks[2]["metrics"]["attempts"]  # a fresh announcement
        assert verify_chain(reader, head).ok


@pytest.mark.integration
def test_an_easy_acceptance_rule_passes_with_fedprox_and_verify_rechecks_it_on_the_eval_data(grid):
    result = run_job(grid, allowed=grid.honest, rounds=2, min_workers=HONEST, accept="val_accuracy>=0.3",
                     proximal_mu=0.01, job_id="accept-easy")
    assert [(r.round, r.accepted, r.tries, r.metrics["accepted"]) for r in result.rounds] == [(1, True, 1, 1.0),
                                                                                            (2, True, 1, 1.0)]
    assert not result.turned_down
    for i in range(HONEST):  # the workers trained with the job's proximal term
        assert "'proximal_mu': 0.01" in grid.local.worker_log(i), grid.local.worker_log(i)[-2000:]
    proc = run_cli("grid_ipfs.client", "verify", "--api", grid.local.apis[2], "--eval-data",
                   str(grid.root / "test.npz"), "--signer", grid.owner.id, "--json", result.head)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout) == {"ok": True, "blocks": 3, "reason": "", "first_bad": None, "evaluated": True,
                                       "ext_checked": False, "contributions_unproven": 0, "witness_records": 0}
    # the verifier's eval data must be the client's: other data gives other numbers, and verify says so
    other = grid.root / "other.npz"
    x, y, _, _ = data.digits()
    data.save_shard(other, x[:300], y[:300])
    proc = run_cli("grid_ipfs.client", "verify", "--api", grid.local.apis[2], "--eval-data", str(other), result.head)
    assert proc.returncode == 1 and "is it the client's eval data?" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.integration
def test_the_clients_norm_screen_refuses_the_scaled_update_and_counts_it(grid, caplog):
    """With the default screen (--max-norm-ratio 10) plain FedAvg survives the same attack: the scaled
    update is refused each round with a log line naming its sender, and counted in the block."""
    attacker = Identity.load_or_create(grid.local.directory / "keys" / f"worker{HONEST}.key").id
    with caplog.at_level("WARNING", logger="grid_ipfs.client"):
        result = run_job(grid, rounds=3, epochs=2, min_workers=HONEST, job_id="byzantine-screened")
    assert [r.updates for r in result.rounds] == [HONEST] * 3, logs(grid)
    assert all(r.rejected == {"outlier norm": 1} and r.metrics["rejected_updates"] == 1.0 for r in result.rounds)
    assert result.rounds[-1].metrics["val_accuracy"] >= 0.85
    refused = [rec.getMessage() for rec in caplog.records if "outlier norm" in rec.getMessage()]
    assert len(refused) == 3 and all(attacker[:12] in line for line in refused), refused
    with grid.local.client(2) as reader:
        blocks = [block for _, block in walk(reader, result.head)]
    assert all(attacker not in {u["worker"] for u in block["updates"]} for block in blocks)


# -- proof of federated learning with competing aggregators (miners) ----------------------------------------


@pytest.fixture(scope="module")
def mined(grid):
    """The owner aggregates with plain FedAvg (norm screen off) under the scaled attack, while two miners
    on other daemons, each judging on its own half of the held-out digits, propose median and Krum
    aggregates. Rule: val_accuracy>=0.6 on the owner's data."""
    _, _, x_test, y_test = data.digits()
    halves = [grid.root / f"miner{i}.npz" for i in range(2)]
    for i, path in enumerate(halves):
        data.save_shard(path, x_test[i::2], y_test[i::2])
    miners = [grid.local.add_miner(halves[0], ["--aggregation", "median"]),
              grid.local.add_miner(halves[1], ["--aggregation", "krum", "--byzantine", "1"])]
    try:
        for i in miners:
            wait_for(lambda i=i: "mining on" in grid.local.miner_log(i), timeout=120, what=f"miner{i} to start")
        result = run_job(grid, rounds=3, epochs=2, min_workers=HONEST + 1, max_norm_ratio=0.0,
                         accept="val_accuracy>=0.6", miners=2, proposal_timeout=90, job_id="pofl")
        ids = [Identity.load_or_create(grid.local.directory / "keys" / f"miner{i}.key").id for i in miners]
        yield SimpleNamespace(result=result, ids=ids, logs=[grid.local.miner_log(i) for i in miners])
    finally:
        for i in miners:
            grid.local.stop_miner(i)


@pytest.mark.integration
def test_miners_robust_aggregates_win_where_the_owners_fedavg_fails_the_rule(grid, mined):
    result = mined.result
    print("\nPoFL rounds: " + "; ".join(f"r{r.round} {r.winner[:8]} {r.metrics['val_accuracy']:.3f} "
                                        f"{[p['verdict'] for p in r.proposals]}" for r in result.rounds))
    assert not result.turned_down, [r.proposals for r in result.turned_down]
    for r in result.rounds:
        assert r.updates == HONEST + 1  # the attacker's update is in every round...
        assert r.winner in mined.ids, (r.winner, r.proposals, mined.logs)  # ...but a miner's rule won it
        assert [p["signer"] for p in r.proposals][0] == grid.owner.id and len(r.proposals) == 3, r.proposals
        owner_score, winner_score = r.proposals[0]["score"], r.metrics["val_accuracy"]
        assert owner_score < winner_score - 0.05, r.proposals  # the attacker dragged the owner's fedavg down
        assert winner_score == max(p["score"] for p in r.proposals)
        assert r.metrics["accepted"] == 1.0 and r.metrics["proposals"] == 2.0
    assert result.rounds[-1].metrics["val_accuracy"] >= 0.85
    # every miner checked every appended block itself and accepted it
    assert all(r.endorsements == {m: "accepted" for m in mined.ids} for r in result.rounds), \
        [r.endorsements for r in result.rounds]
    assert any("our proposal won" in log for log in mined.logs), mined.logs


@pytest.mark.integration
def test_a_mined_chain_records_the_contest_and_verifies_from_another_node(grid, mined):
    from grid_ipfs import messages
    from grid_ipfs.chain import decode_block
    from grid_ipfs.ipfs.cids import cid_str

    with grid.local.client(2) as reader:
        blocks = [block for _, block in walk(reader, mined.result.head)][::-1]
        assert [b["round"] for b in blocks] == [0, 1, 2, 3]
        for block in blocks[1:]:
            pofl = block["ext"]["pofl"]
            winner = decode_block(reader.block_get(pofl["block"]), pofl["block"])
            assert block["signer"] == grid.owner.id and winner["signer"] == pofl["winner"] in mined.ids
            assert cid_str(winner["weights"]) == cid_str(block["weights"])
            assert winner["aggregation"]["name"] == block["aggregation"]["name"] in ("median", "krum")
            assert len(pofl["candidates"]) == 3 and cid_str(pofl["block"]) in map(cid_str, pofl["candidates"])
        # from round 2 on, a block carries the miners' signed endorsements of the block before it
        assert "endorsements" not in blocks[1]["ext"]["pofl"]  # genesis is nobody's to endorse
        for previous, block in zip(blocks[1:], blocks[2:]):
            endorsed = [messages.decode(reader.block_get(link)) for link in block["ext"]["pofl"]["endorsements"]]
            assert sorted(e.sender for e in endorsed) == sorted(mined.ids), endorsed
            assert all(e.message.verdict == "accepted" and e.message.round == previous["round"]
                       and cid_str(e.message.head) == cid_str(block["prev"]) for e in endorsed), endorsed
    proc = run_cli("grid_ipfs.chain", "verify", "--api", grid.local.apis[1], "--signer", grid.owner.id,
                   mined.result.head)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_miner_and_client_command_lines_refuse_bad_mining_options(tmp_path):
    proc = run_cli("grid_ipfs.miner", "--help")
    assert proc.returncode == 0 and "--eval-data" in proc.stdout and "--aggregation" in proc.stdout
    proc = run_cli("grid_ipfs.miner", "--api", "/ip4/127.0.0.1/tcp/9", "--eval-data", str(tmp_path / "none.npz"))
    assert proc.returncode == 1 and "none.npz" in proc.stderr, proc.stderr
    proc = run_cli("grid_ipfs.miner", "--api", "/ip4/127.0.0.1/tcp/9", "--eval-data", "x.npz", "--trim", "0.2")
    assert proc.returncode == 2 and "--aggregation" in proc.stderr, proc.stderr
    proc = run_cli("grid_ipfs.miner", "--api", "/ip4/127.0.0.1/tcp/9", "--eval-data", "x.npz",
                   "--aggregation", "dp-fedavg")
    assert proc.returncode == 2 and "dp-fedavg" in proc.stderr, proc.stderr


@pytest.mark.integration
def test_a_job_with_miners_needs_the_owners_eval_data(grid):
    from grid_ipfs.client import JobFailed

    with pytest.raises(JobFailed, match="with miners the client evaluates every rival aggregate itself"):
        run_job(grid, rounds=1, miners=1, eval_data=None, job_id="pofl-no-eval")


# -- secure aggregation -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_secure_aggregation_trains_hides_every_update_and_survives_a_silent_worker(grid):
    """4 honest workers, pairwise-masked updates. In round 2 one worker freezes (SIGSTOP): its masks would
    stay in the sum, so the attempt is abandoned and the round announced again among the three others."""
    import signal

    from grid_ipfs.client import Client, ClientCallback, JobSpec
    from grid_ipfs.payloads import weights_from_bytes

    frozen = grid.local.workers[0]

    class FreezeInRound2(ClientCallback):
        starts: list = []

        def on_round_start(self, round, expected, deadline):
            self.starts.append((round, expected))
            if round == 2 and len(self.starts) == 2:
                frozen.send_signal(signal.SIGSTOP)

    spec = JobSpec(model_path=grid.root / "digits.keras", eval_data=grid.root / "test.npz", rounds=2, epochs=2,
                   min_workers=3, round_timeout=25, join_timeout=120, max_retries=1, aggregation="secure-fedavg",
                   secure_aggregation=True, job_id="secure")
    try:
        with grid.local.client(0) as ipfs:
            result = Client(ipfs, grid.owner, head_dir=grid.root / "heads", allowed_workers=grid.honest,
                            callbacks=[FreezeInRound2()]).submit(spec)
    finally:
        frozen.send_signal(signal.SIGCONT)
    assert FreezeInRound2.starts == [(1, HONEST), (2, HONEST), (2, HONEST - 1)], FreezeInRound2.starts
    assert [(r.updates, r.attempts) for r in result.rounds] == [(HONEST, 1), (HONEST - 1, 2)], result.rounds
    assert result.rounds[-1].metrics["val_accuracy"] >= 0.85
    with grid.local.client(2) as reader:
        blocks = [block for _, block in walk(reader, result.head)][::-1]
        assert [b["aggregation"]["name"] for b in blocks[1:]] == ["secure-fedavg"] * 2
        last = blocks[-1]
        global_weights = weights_from_bytes(reader.cat(last["weights"]))
        for update in last["updates"]:  # what IPFS and the chain hold is masked: uint64 noise, not weights
            masked = weights_from_bytes(reader.cat(update["weights"]))
            assert masked[0].dtype == np.uint64
            readable = masked[0].view(np.int64).astype(np.float64) / 2 ** 24 / update["num_examples"]
            assert np.abs(readable - global_weights[0]).mean() > 1e3
    proc = run_cli("grid_ipfs.chain", "verify", "--api", grid.local.apis[1], "--signer", grid.owner.id, result.head)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.integration
def test_workers_refuse_to_mask_against_a_key_the_owner_swapped_in(grid):
    """A hostile owner (this test, signing as the job's owner) lists a mask key of its own for worker B:
    worker A's masks towards B would then be the owner's to remove, exposing A's update. A checks that
    every key carries its worker's signature and refuses the round; B does not find its key and refuses
    too. The same round with the keys the workers signed is trained by both."""
    from grid_ipfs import messages
    from grid_ipfs.ipfs.pubsub import Subscription
    from grid_ipfs.secagg import MaskKey

    job_id = "secure-swapped-key"
    topic = messages.job_topic(job_id)
    index = {Identity.load_or_create(grid.local.directory / "keys" / f"worker{i}.key").id: i for i in range(HONEST)}
    with grid.local.client(0) as ipfs, Subscription(grid.local.apis[0], topic) as sub:
        sub.wait_ready()
        model = ipfs.add((grid.root / "digits.keras").read_bytes())
        weights = str(ipfs.add(weights_to_bytes(zoo.digits_mlp(seed=0).get_weights())))
        genesis = str(ChainLog(ipfs, None).append({"job": job_id, "round": 0, "model": model, "weights": weights,
                                                   "aggregation": {"name": "init", "params": {}}, "updates": [],
                                                   "metrics": {}}, grid.owner))  # the head workers sign against
        job = messages.encode(messages.Job(job_id, model, grid.owner.id, {"epochs": 1, "batch_size": 32,
                                                                          "rounds": 1, "secure_aggregation": True}),
                              grid.owner)
        heard: dict[tuple, messages.Message] = {}

        def listen(publish: bytes, on_topic: str) -> dict:
            ipfs.pubsub_publish(on_topic, publish)
            while (raw := sub.get(timeout=0.5)) is not None:
                try:
                    envelope = messages.decode(raw.data)
                except messages.MessageError:
                    continue
                if envelope.sender in index:
                    msg = envelope.message
                    heard[(msg.TYPE, envelope.sender, getattr(msg, "attempt", None))] = msg
            return heard

        wait_for(lambda: sum(kind == "join" for kind, _, _ in listen(job, messages.JOBS_TOPIC)) >= 2, timeout=120,
                 what="two honest workers to join")
        a, b = sorted(sender for kind, sender, _ in heard if kind == "join")[:2]
        joins = {w: heard[("join", w, None)] for w in (a, b)}
        assert all(join.mask_key and join.mask_sig for join in joins.values())

        def round_message(attempt: int, keys: dict) -> bytes:
            return messages.encode(messages.Round(job_id, 1, weights, time.time() + 120, [a, b], attempt=attempt,
                                                  mask_keys=keys, mask_sigs={w: joins[w].mask_sig for w in (a, b)},
                                                  head=genesis),
                                   grid.owner)

        genuine = {w: joins[w].mask_key for w in (a, b)}
        swapped = round_message(1, {**genuine, b: MaskKey().public})
        wait_for(lambda: listen(swapped, topic) is not None
                 and "are not signed by those workers" in grid.local.worker_log(index[a])
                 and "does not carry our mask key" in grid.local.worker_log(index[b]),
                 timeout=60, what="both workers to refuse the round with a swapped key")
        assert not [key for key in heard if key[0] == "update"], "a worker masked against the owner's key"

        honest = round_message(2, genuine)
        wait_for(lambda: {("update", a, 2), ("update", b, 2)} <= set(listen(honest, topic)), timeout=120,
                 what="both workers to train the round with the keys they signed")
        ipfs.pubsub_publish(topic, messages.encode(messages.Done(job_id, weights, reason="test over"), grid.owner))


@pytest.mark.integration
def test_dp_over_secure_aggregation_trains_and_its_budget_covers_chain_readers(grid):
    """The workers clip their deltas and add their noise shares before masking: the chain holds no update
    and no noise seed, and `chain privacy` says the bound covers its readers."""
    result = run_job(grid, allowed=grid.honest, rounds=2, epochs=2, min_workers=HONEST,
                     aggregation="secure-dp-fedavg", aggregation_params={"clip": 3.0, "noise_multiplier": 0.05},
                     secure_aggregation=True, job_id="secure-dp")
    assert [r.updates for r in result.rounds] == [HONEST, HONEST]
    assert result.rounds[-1].metrics["val_accuracy"] >= 0.6, [r.metrics for r in result.rounds]
    proc = run_cli("grid_ipfs.chain", "verify", "--api", grid.local.apis[2], "--signer", grid.owner.id, result.head)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_cli("grid_ipfs.chain", "privacy", "--api", grid.local.apis[1], result.head, "--json")
    budget = json.loads(proc.stdout)
    accuracy = [round(r.metrics["val_accuracy"], 3) for r in result.rounds]
    print(f"\nsecure-dp-fedavg (C 3, z 0.05): val_accuracy {accuracy}, epsilon {budget['epsilon']:.4g}")
    assert budget["private"] and budget["epsilon"] > 0 and budget["rounds"] == 2, budget
    proc = run_cli("grid_ipfs.chain", "privacy", "--api", grid.local.apis[1], result.head)
    assert "the bound covers chain readers too" in proc.stdout, proc.stdout
