"""Chain tools: `chain plot` (learning curves), `chain export` (a round's global model to a .keras or
.onnx file), `chain verify --eval-data`, `chain show` piped, and the `identity show|new` CLI.

Unit tests need no daemon. The integration tests build real 2-round FedAvg chains of the XOR model on
a 1-node devnet and drive the CLIs as subprocesses, as an operator would.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from grid_ipfs.chain.export import ExportError, check_request, onnx_available, select_block
from grid_ipfs.chain.plot import collect_series, metric_kind, plot_chain
from grid_ipfs.identity import Identity, is_public_id

from .cli import run_cli

PNG = b"\x89PNG\r\n\x1a\n"
UNREACHABLE = "/ip4/127.0.0.1/tcp/9"


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def _blocks(metrics_per_round: list[dict], job: str = "digits-1") -> list[dict]:
    return [{"job": job, "seq": r, "round": r, "metrics": m} for r, m in enumerate(metrics_per_round)]


# -- plot_chain (no daemon) ----------------------------------------------------------------------------


def test_plot_chain_classification_groups_train_val_and_eval_per_metric(tmp_path):
    rounds = [{"val_loss": 2.3, "val_accuracy": 0.1}]
    rounds += [{"loss": 1 / r, "accuracy": 1 - 0.5 / r, "val_loss": 1.1 / r, "val_accuracy": 1 - 0.4 / r,
                "eval_loss": 1.2 / r, "eval_accuracy": 0.9 - 0.3 / r,
                "attempts": 1.0, "rejected_updates": 0.0, "dropped_messages": 3.0} for r in range(1, 6)]
    out = tmp_path / "run.png"
    panels = plot_chain(_blocks(rounds), out, head="bafyreiabcdefghijklmnop")
    assert is_png(out)
    assert panels == {"loss": ["loss", "val_loss", "eval_loss"],
                      "accuracy": ["accuracy", "val_accuracy", "eval_accuracy"]}  # loss first, counters left out
    series = collect_series(_blocks(rounds))
    assert series["loss"]["val_"][0] == (0, 2.3)  # round 0: the held-out score of the initial weights
    assert [r for r, _ in series["accuracy"][""]] == [1, 2, 3, 4, 5]


def test_plot_chain_works_with_missing_and_partial_metrics(tmp_path):
    # genesis without metrics, a round without val_*, a round with nothing at all, a stray non-number
    rounds = [{}, {"loss": 0.9, "accuracy": 0.5}, {}, {"loss": 0.4, "val_accuracy": 0.8, "note": "x"}]
    out = tmp_path / "partial.png"
    panels = plot_chain(_blocks(rounds), out)
    assert is_png(out)
    assert panels == {"loss": ["loss"], "accuracy": ["accuracy", "val_accuracy"]}


def test_plot_chain_with_no_metrics_at_all_still_writes_an_image(tmp_path):
    out = tmp_path / "empty.png"
    assert plot_chain(_blocks([{}, {}]), out) == {}
    assert is_png(out)


def test_plot_chain_regression_metrics_get_their_own_loss_like_panels(tmp_path):
    rounds = [{}] + [{"loss": 3000.0 / r, "mae": 40.0 / r, "val_loss": 3100.0 / r, "val_mae": 41.0 / r,
                      "eval_mse": 2900.0 / r} for r in range(1, 4)]
    out = tmp_path / "regression.png"
    panels = plot_chain(_blocks(rounds, "diabetes-1"), out)
    assert is_png(out)
    assert list(panels) == ["loss", "mae", "mse"]
    assert panels["mae"] == ["mae", "val_mae"]


def test_plot_chain_accepts_walk_pairs_and_names_the_head(tmp_path):
    pairs = [(f"bafyreiblock{r}", b) for r, b in enumerate(_blocks([{}, {"loss": 1.0}, {"loss": 0.5}]))]
    out = tmp_path / "pairs.png"
    assert plot_chain(pairs, out) == {"loss": ["loss"]}
    assert is_png(out)


@pytest.mark.parametrize("name, kind", [
    ("loss", "loss"), ("mae", "loss"), ("mse", "loss"), ("mean_squared_error", "loss"), ("rmse", "loss"),
    ("binary_crossentropy", "loss"), ("accuracy", "accuracy"), ("sparse_categorical_accuracy", "accuracy"),
    ("auc", "accuracy"), ("precision", "accuracy"), ("r2_score", "accuracy"), ("num_batches", "other"),
])
def test_metric_kind(name, kind):
    assert metric_kind(name) == kind


# -- export, checks that need no daemon ----------------------------------------------------------------


def test_export_refuses_bad_requests_before_reading_anything(tmp_path):
    with pytest.raises(ExportError, match=r"must end in \.keras"):
        check_request(tmp_path / "model.h5")
    with pytest.raises(ExportError, match="does not exist"):
        check_request(tmp_path / "nowhere" / "model.keras")
    check_request(tmp_path / "model.keras")
    if onnx_available():
        check_request(tmp_path / "model.onnx", onnx=True)
        with pytest.raises(ExportError, match=r"must end in \.onnx with --onnx"):
            check_request(tmp_path / "model.keras", onnx=True)
    else:
        with pytest.raises(ExportError, match="pip install tf2onnx"):
            check_request(tmp_path / "model.onnx", onnx=True)
    assert list(tmp_path.iterdir()) == []


WITHOUT_TF2ONNX = ("import sys; sys.modules['tf2onnx'] = None  # as if not installed\n"
                   "from grid_ipfs.chain.__main__ import main; sys.exit(main(sys.argv[1:]))")


def run_chain_without_tf2onnx(*args: str) -> subprocess.CompletedProcess:
    """`python -m grid_ipfs.chain ARGS` in a process where `import tf2onnx` fails, installed or not."""
    return subprocess.run([sys.executable, "-c", WITHOUT_TF2ONNX, *args], capture_output=True, text=True,
                          timeout=120)


def test_export_onnx_without_tf2onnx_fails_in_one_line_before_connecting(tmp_path):
    out = tmp_path / "model.onnx"
    from multiformats import CID, multihash

    head = str(CID("base32", 1, "dag-cbor", multihash.digest(b"a block", "sha2-256")))
    proc = run_chain_without_tf2onnx("export", "--api", UNREACHABLE, head, "-o", str(out), "--onnx")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == ["error: --onnx needs tf2onnx, which is not installed: pip install tf2onnx"]
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_select_block_takes_the_newest_or_the_round_asked():
    blocks = [(f"cid{r}", {"seq": r, "round": r}) for r in (2, 1, 0)]
    assert select_block(blocks, None)[0] == "cid2"
    assert select_block(blocks, 1)[0] == "cid1"
    with pytest.raises(ExportError, match=r"round 7 is not in this chain \(it holds rounds 0\.\.2\)"):
        select_block(blocks, 7)


@pytest.mark.parametrize("command", ["plot", "export", "show", "verify"])
def test_a_head_that_is_not_a_cid_is_named_in_one_error_line(tmp_path, command):
    extra = {"plot": ["-o", str(tmp_path / "x.png")], "export": ["-o", str(tmp_path / "x.keras")]}.get(command, [])
    proc = run_cli("grid_ipfs.chain", command, "--api", UNREACHABLE, "not-a-cid", *extra, timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'not-a-cid'" in lines[0], proc.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.keras").exists()


# -- identity CLI ----------------------------------------------------------------------------------------


def test_identity_new_then_show_print_the_same_full_id(tmp_path):
    key = tmp_path / "keys" / "w.key"
    key.parent.mkdir()
    created = run_cli("grid_ipfs.identity", "new", str(key), timeout=60)
    assert created.returncode == 0, created.stderr
    public_id = created.stdout.strip()
    assert is_public_id(public_id) and len(public_id) == 43
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert Identity.load_or_create(key).id == public_id
    shown = run_cli("grid_ipfs.identity", "show", str(key), timeout=60)
    assert shown.returncode == 0 and shown.stdout == public_id + "\n", shown.stderr
    again = run_cli("grid_ipfs.identity", "new", str(key), timeout=60)  # never overwrites a key
    assert again.returncode == 1 and "already exists" in again.stderr
    assert Identity.load_or_create(key).id == public_id


def test_identity_show_creates_nothing_and_fails_on_a_missing_key(tmp_path):
    missing = tmp_path / "absent.key"
    proc = run_cli("grid_ipfs.identity", "show", str(missing), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: no key file at") and str(missing) in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_identity_roles_use_the_default_key_files(tmp_path):
    env = {"GRID_IPFS_HOME": str(tmp_path / "home")}
    absent = run_cli("grid_ipfs.identity", "show", "--role", "worker-a", env=env, timeout=60)
    assert absent.returncode == 1 and "worker-a.key" in absent.stderr
    assert not (tmp_path / "home").exists()
    created = run_cli("grid_ipfs.identity", "new", "--role", "worker-a", env=env, timeout=60)
    assert created.returncode == 0, created.stderr
    assert (tmp_path / "home" / "worker-a.key").is_file()
    shown = run_cli("grid_ipfs.identity", "show", "--role", "worker-a", env=env, timeout=60)
    assert shown.stdout == created.stdout and is_public_id(shown.stdout.strip())
    # the printed ids make a valid allow-list file
    from grid_ipfs.identity import read_id_list

    allow = tmp_path / "allow.txt"
    allow.write_text(shown.stdout)
    assert read_id_list(allow) == {shown.stdout.strip()}


def test_identity_cli_usage_errors(tmp_path):
    assert run_cli("grid_ipfs.identity", "show", timeout=60).returncode == 2  # neither KEYFILE nor --role
    assert run_cli("grid_ipfs.identity", "show", "--role", "../etc", timeout=60).returncode == 2
    assert run_cli("grid_ipfs.identity", "show", str(tmp_path / "k"), "--role", "client", timeout=60).returncode == 2


def test_identity_show_refuses_a_key_open_to_others(tmp_path):
    key = tmp_path / "open.key"
    Identity.load_or_create(key)
    key.chmod(0o644)
    proc = run_cli("grid_ipfs.identity", "show", str(key), timeout=60)
    assert proc.returncode == 1 and "chmod 600" in proc.stderr


# -- integration: a real chain on a real daemon --------------------------------------------------------


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Genesis + 2 FedAvg rounds of the XOR model, every object on a 1-node devnet; the daemon is stopped
    (by PID) at the end of the module, pass or fail."""
    from grid_ipfs import zoo
    from grid_ipfs.aggregate import fedavg
    from grid_ipfs.chain import ChainLog
    from grid_ipfs.ipfs.cids import cid_str
    from grid_ipfs.ipfs.devnet import Devnet
    from grid_ipfs.payloads import model_to_bytes, weights_to_bytes

    from .test_chain_format import signed_update

    root = tmp_path_factory.mktemp("chain_tools")
    net = Devnet.up(1, root / "devnet")
    try:
        with net.nodes[0].client() as client:
            model = zoo.xor_mlp(seed=0)
            owner, workers = Identity.generate(), sorted((Identity.generate() for _ in range(3)), key=lambda i: i.id)
            model_cid = cid_str(client.add(model_to_bytes(model)))
            weights = [w.copy() for w in model.get_weights()]
            log = ChainLog(client, None)
            global_weights = [weights]
            cids = [log.append({"job": "xor-tools", "round": 0, "model": model_cid,
                                "weights": client.add(weights_to_bytes(weights)),
                                "aggregation": {"name": "init", "params": {}}, "updates": [],
                                "metrics": {"val_loss": 0.70, "val_accuracy": 0.5}, "config": {"rounds": 2}},
                               owner)]
            rng = np.random.default_rng(0)
            for r in (1, 2):
                base = client.add(weights_to_bytes(weights))
                updates = [([(w + 0.1 * rng.standard_normal(w.shape)).astype(w.dtype) for w in weights],
                            int(rng.integers(4, 40))) for _ in workers]
                weights = fedavg(updates)
                global_weights.append(weights)
                entries = []
                for worker, (w, n) in zip(workers, updates):
                    sent, trained = client.add(weights_to_bytes(w)), {"loss": 0.7 - 0.1 * r, "accuracy": 0.5 + 0.1 * r}
                    entries.append({"worker": worker.id, "weights": sent, "num_examples": n,
                                    "metrics": {**trained, "eval_loss": 0.72 - 0.1 * r},
                                    "message": signed_update(client, worker, job="xor-tools", round_=r, head=log.head,
                                                             base=base, weights=sent, num_examples=n, metrics=trained,
                                                             eval_metrics={"loss": 0.72 - 0.1 * r})})
                cids.append(log.append({
                    "job": "xor-tools", "round": r, "model": model_cid,
                    "weights": client.add(weights_to_bytes(weights)),
                    "aggregation": {"name": "fedavg", "params": {}},
                    "updates": entries,
                    "metrics": {"loss": 0.7 - 0.1 * r, "accuracy": 0.5 + 0.1 * r, "eval_loss": 0.72 - 0.1 * r,
                                "attempts": 1.0}}, owner))
        from types import SimpleNamespace

        yield SimpleNamespace(api=net.nodes[0].api, root=root, cids=[cid_str(c) for c in cids], owner=owner,
                              weights=global_weights, head=cid_str(cids[-1]), model_cid=model_cid)
    finally:
        net.stop()


def _exported_weights(path: Path) -> list[np.ndarray]:
    import keras

    return keras.saving.load_model(path, safe_mode=True).get_weights()


def _assert_equal_weights(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


@pytest.mark.integration
def test_chain_verifies(chain):  # the fixture's chain is a real one: the tools below read a valid history
    proc = run_cli("grid_ipfs.chain", "verify", "--api", chain.api, chain.head)
    assert proc.returncode == 0 and "OK: 3 blocks verified" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.integration
def test_plot_cli_writes_a_png_of_the_chain(chain):
    out = chain.root / "run.png"
    proc = run_cli("grid_ipfs.chain", "plot", "--api", chain.api, chain.head, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert is_png(out)
    assert f"wrote {out}: job xor-tools, rounds 0..2" in proc.stdout
    assert "loss: loss, val_loss, eval_loss" in proc.stdout and "accuracy: accuracy, val_accuracy" in proc.stdout


@pytest.mark.integration
def test_export_cli_writes_the_head_model_with_the_head_weights(chain):
    out = chain.root / "model.keras"
    proc = run_cli("grid_ipfs.chain", "export", "--api", chain.api, chain.head, "-o", str(out), "--json",
                   "--signer", chain.owner.id)
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout)
    assert done["round"] == 2 and done["block"] == chain.head and done["model"] == chain.model_cid
    _assert_equal_weights(_exported_weights(out), chain.weights[2])
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]  # no temporary file left behind


@pytest.mark.integration
def test_export_cli_round_1_gives_round_1_weights(chain):
    out = chain.root / "round1.keras"
    proc = run_cli("grid_ipfs.chain", "export", "--api", chain.api, chain.head, "-o", str(out), "--round", "1")
    assert proc.returncode == 0, proc.stderr
    assert "job xor-tools round 1" in proc.stdout and chain.cids[1] in proc.stdout
    got = _exported_weights(out)
    _assert_equal_weights(got, chain.weights[1])
    assert any(not np.array_equal(a, b) for a, b in zip(got, chain.weights[2]))


@pytest.mark.integration
def test_export_cli_refuses_a_round_not_in_the_chain_and_a_foreign_signer(chain):
    out = chain.root / "none.keras"
    proc = run_cli("grid_ipfs.chain", "export", "--api", chain.api, chain.head, "-o", str(out), "--round", "9")
    assert proc.returncode == 1 and "round 9 is not in this chain" in proc.stderr, proc.stderr
    other = Identity.generate().id
    proc = run_cli("grid_ipfs.chain", "export", "--api", chain.api, chain.head, "-o", str(out), "--signer", other)
    assert proc.returncode == 1 and f"expected {other}" in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.integration
def test_export_onnx_without_tf2onnx_says_how_to_install_it_and_writes_nothing(chain):
    out_dir = chain.root / "no-onnx"
    out_dir.mkdir()
    proc = run_chain_without_tf2onnx("export", "--api", chain.api, chain.head, "-o", str(out_dir / "model.onnx"),
                                     "--onnx")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["error: --onnx needs tf2onnx, which is not installed: pip install tf2onnx"]
    assert list(out_dir.iterdir()) == []


@pytest.mark.integration
def test_export_onnx_writes_a_model_that_computes_what_the_round_weights_compute(chain):
    """tf2onnx is in the dev extra (and the `onnx` extra): a real conversion, run by onnx's reference
    runtime (no onnxruntime needed), must give the Keras model's outputs with round 1's weights."""
    assert onnx_available(), "tf2onnx is missing: pip install -e '.[dev]' (or '.[onnx]')"
    import onnx
    from onnx.reference import ReferenceEvaluator

    from grid_ipfs import zoo

    out_dir = chain.root / "onnx"
    out_dir.mkdir()
    out = out_dir / "model.onnx"
    proc = run_cli("grid_ipfs.chain", "export", "--api", chain.api, chain.head, "-o", str(out), "--onnx",
                   "--round", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads(proc.stdout)
    assert done["format"] == "onnx" and done["round"] == 1 and done["block"] == chain.cids[1]
    assert [p.name for p in out_dir.iterdir()] == ["model.onnx"]  # no temporary file left behind
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    x = np.random.default_rng(1).uniform(-1, 2, size=(16, 2)).astype(np.float32)
    got = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x})[0]
    keras_model = zoo.xor_mlp(seed=0)
    for weights, close in ((chain.weights[1], True), (chain.weights[2], False)):
        keras_model.set_weights(weights)
        want = keras_model.predict(x, verbose=0)
        assert got.shape == want.shape
        assert np.allclose(got, want, atol=1e-5) == close, np.abs(got - want).max()


@pytest.mark.integration
def test_bad_head_against_a_live_daemon_is_named(chain):
    proc = run_cli("grid_ipfs.chain", "plot", "--api", chain.api, "bafy-not-a-cid", "-o", str(chain.root / "b.png"))
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "'bafy-not-a-cid'" in proc.stderr, proc.stderr


@pytest.mark.integration
def test_show_piped_prints_every_cid_whole_one_row_per_line(chain):
    proc = run_cli("grid_ipfs.chain", "show", "--api", chain.api, chain.head)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(run_cli("grid_ipfs.chain", "show", "--api", chain.api, chain.head, "--json").stdout)
    assert [row["cid"] for row in rows] == chain.cids
    for row in rows:
        line = next((line for line in proc.stdout.splitlines() if row["cid"] in line), None)
        assert line is not None, f"{row['cid']} not printed whole:\n{proc.stdout}"
        assert row["weights"] in line  # the block's weights CID whole, on the same line
    assert chain.model_cid in proc.stdout


# -- chain verify --eval-data: the recorded val_* metrics re-evaluated ---------------------------------


def xor_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).uniform(0, 1, size=(n, 2)).astype(np.float32)
    return x, ((x[:, 0] > 0.5) != (x[:, 1] > 0.5)).astype(np.float32)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Two chains of the XOR model on a 1-node devnet whose val_* metrics are the model evaluated on
    `eval.npz`, as the client records them: `head` honest, `tampered` the same but with round 2's
    val_loss recorded 0.05 too low (and signed, so only re-evaluating can tell)."""
    from grid_ipfs import data, zoo
    from grid_ipfs.aggregate import fedavg
    from grid_ipfs.chain import ChainLog
    from grid_ipfs.ipfs.cids import cid_str
    from grid_ipfs.ipfs.devnet import Devnet
    from grid_ipfs.payloads import model_from_bytes, model_to_bytes, weights_to_bytes
    from grid_ipfs.training import evaluate

    from .test_chain_format import signed_update

    root = tmp_path_factory.mktemp("chain_eval")
    eval_path = data.save_shard(root / "eval.npz", *xor_data(200, seed=0))
    data.save_shard(root / "other.npz", *xor_data(200, seed=1))
    data.save_shard(root / "wide.npz", np.zeros((8, 3), np.float32), np.zeros(8, np.float32))
    x, y = data.load_shard(eval_path)
    blob = model_to_bytes(zoo.xor_mlp(seed=0))
    model = model_from_bytes(blob)
    val = lambda weights: {f"val_{k}": v for k, v in evaluate(model, weights, x, y).items()}
    net = Devnet.up(1, root / "devnet")
    try:
        with net.nodes[0].client() as client:
            owner, worker = Identity.generate(), Identity.generate()
            model_cid = client.add(blob)
            rng = np.random.default_rng(0)
            history = [[w.copy() for w in model.get_weights()]]
            for _ in (1, 2):
                updates = [([(w + 0.3 * rng.standard_normal(w.shape)).astype(w.dtype) for w in history[-1]], 10)]
                history.append(fedavg(updates))
            heads, cids = {}, {}
            for name, shift in (("head", 0.0), ("tampered", -0.05)):
                log = ChainLog(client, None)
                cids[name] = [log.append({"job": f"xor-eval-{name}", "round": 0, "model": model_cid,
                                          "weights": client.add(weights_to_bytes(history[0])),
                                          "aggregation": {"name": "init", "params": {}}, "updates": [],
                                          "metrics": val(history[0])}, owner)]
                for r in (1, 2):
                    metrics = val(history[r])
                    if r == 2:
                        metrics["val_loss"] += shift
                    sent = client.add(weights_to_bytes(history[r]))
                    message = signed_update(client, worker, job=f"xor-eval-{name}", round_=r, head=log.head,
                                            base=client.add(weights_to_bytes(history[r - 1])), weights=sent,
                                            num_examples=10, metrics={})
                    cids[name].append(log.append({
                        "job": f"xor-eval-{name}", "round": r, "model": model_cid,
                        "weights": client.add(weights_to_bytes(history[r])),
                        "aggregation": {"name": "fedavg", "params": {}},
                        "updates": [{"worker": worker.id, "weights": sent, "num_examples": 10, "metrics": {},
                                     "message": message}],
                        "metrics": metrics}, owner))
                heads[name] = cid_str(log.head)
        from types import SimpleNamespace

        yield SimpleNamespace(api=net.nodes[0].api, root=root, eval=eval_path, head=heads["head"],
                              tampered=heads["tampered"], tampered_block=cid_str(cids["tampered"][2]),
                              recorded_loss=val(history[2])["val_loss"])
    finally:
        net.stop()


@pytest.mark.integration
def test_chain_verify_with_eval_data_re_evaluates_every_block(evaluated):
    proc = run_cli("grid_ipfs.chain", "verify", "--api", evaluated.api, evaluated.head, "--eval-data",
                   str(evaluated.eval))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == (f"OK: 3 blocks verified from {evaluated.head} to genesis, metrics re-evaluated on "
                           f"{evaluated.eval}\n")
    proc = run_cli("grid_ipfs.chain", "verify", "--api", evaluated.api, evaluated.head, "--json")
    assert json.loads(proc.stdout) == {"ok": True, "blocks": 3, "reason": "", "first_bad": None, "evaluated": False,
                                       "ext_checked": False, "contributions_unproven": 0, "witness_records": 0}


@pytest.mark.integration
def test_chain_verify_with_eval_data_names_a_tampered_metric(evaluated):
    plain = run_cli("grid_ipfs.chain", "verify", "--api", evaluated.api, evaluated.tampered)
    assert plain.returncode == 0, plain.stdout + plain.stderr  # signed and consistent: only evaluation tells
    proc = run_cli("grid_ipfs.chain", "verify", "--api", evaluated.api, evaluated.tampered, "--eval-data",
                   str(evaluated.eval), "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["first_bad"] == evaluated.tampered_block and report["evaluated"] is True
    assert report["reason"] == (f"block 2 (seq 2): recorded val_loss {evaluated.recorded_loss - 0.05:.6g}, but the "
                                f"verifier's evaluation gives {evaluated.recorded_loss:.6g} (is it the client's "
                                "eval data?)"), report["reason"]


@pytest.mark.integration
def test_chain_verify_with_other_or_unfit_eval_data_fails(evaluated):
    proc = run_cli("grid_ipfs.chain", "verify", "--api", evaluated.api, evaluated.head, "--eval-data",
                   str(evaluated.root / "other.npz"))
    assert proc.returncode == 1
    assert proc.stdout.startswith("FAILED at block 0 (") and "): recorded val_" in proc.stdout
    assert "is it the client's eval data?" in proc.stdout, proc.stdout
    for path, message in ((evaluated.root / "wide.npz", "error: data x has feature shape (3,) but the model "
                                                         "expects (2,)"),
                          (evaluated.root / "absent.npz", f"error: shard file not found: {evaluated.root}/absent.npz")):
        proc = run_cli("grid_ipfs.chain", "verify", "--api", evaluated.api, evaluated.head, "--eval-data", str(path))
        assert proc.returncode == 1 and proc.stdout == "", proc.stdout
        assert proc.stderr.splitlines() == [message], proc.stderr


def test_chain_verify_refuses_a_missing_eval_file_before_connecting(tmp_path):
    from multiformats import CID, multihash

    head = str(CID("base32", 1, "dag-cbor", multihash.digest(b"a block", "sha2-256")))
    proc = run_cli("grid_ipfs.chain", "verify", "--api", UNREACHABLE, head, "--eval-data", str(tmp_path / "x.npz"),
                   timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: shard file not found: {tmp_path}/x.npz"], proc.stderr
