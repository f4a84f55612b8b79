"""overhead: the digits MLP on a 3-worker grid against the same FedAvg rounds in one process, no transport.

Grid: `LocalGrid` (3 js-ipfs/Kubo nodes, one worker process per node, each on one IID shard from
`data.split_iid(seed=0)`) and an in-process `grid_ipfs.client.Client` on node 0 running R rounds with a
held-out evaluation set. Its per-round time is `RoundResult.seconds` (round announced -> updates fetched,
aggregated, added, chained, evaluated); joining is not part of any round.

In process: exactly the work of those rounds with no IPFS, no pubsub and no serialisation: per worker
(same shard, same `train_val_split(0.1, seed=0)`, its own model loaded from the same `.keras` bytes,
`fit(seed=round)` as the worker does) evaluate the incoming weights on the validation split and train;
then `aggregate.fedavg` and the evaluation of the new global model, all sequential in one process.

Each repeat runs a fresh job on the grid, then the in-process rounds (after the job, so the workers are
idle and not still importing TensorFlow). `overhead_s_per_round` = grid - in process, per repeat.
Targets: overhead <= 1.0 s/round, |grid_acc - inprocess_acc| <= 0.03.
"""

from __future__ import annotations

import secrets
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common
from benchmarks.common import cell, log, table, verdict

NAME = "overhead"
DEFAULT_REPEATS = (3, 2)
WORKERS = 3
TARGET_OVERHEAD_S = 1.0
TARGET_ACC_DIFF = 0.03
JOIN_TIMEOUT = 240.0  # workers import TensorFlow and load the model first
VAL_SPLIT = 0.1  # the worker's default --val-split
WORKER_SEED = 0  # the worker's default --seed


@dataclass
class Task:
    name: str
    model_path: Path
    shards: list[Path]
    test_path: Path
    rounds: int
    epochs: int
    batch_size: int
    train_examples: int
    test_examples: int

    def describe(self) -> dict:
        return {"task": self.name, "workers": len(self.shards), "rounds": self.rounds, "epochs": self.epochs,
                "batch_size": self.batch_size, "train_examples": self.train_examples,
                "test_examples": self.test_examples}


def digits_task(directory: Path, *, workers: int = WORKERS, rounds: int = 5, epochs: int = 2,
                batch_size: int = 32, hidden: int = 64) -> Task:
    """sklearn digits, `split_iid(seed=0)` shards, `zoo.digits_mlp(seed=0)` (the demo's task)."""
    from grid_ipfs import data, zoo

    x_train, y_train, x_test, y_test = data.digits()
    shards = data.write_shards(directory / "shards", data.split_iid(x_train, y_train, workers, seed=0))
    test_path = data.save_shard(directory / "test.npz", x_test, y_test)
    model_path = directory / "digits_mlp.keras"
    zoo.digits_mlp(seed=0, hidden=hidden).save(model_path)
    name = "digits_mlp" if hidden == 64 else f"digits_mlp(hidden={hidden})"
    return Task(name, model_path, shards, test_path, rounds, epochs, batch_size, len(x_train), len(x_test))


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def run_inprocess(task: Task) -> dict:
    """The task's FedAvg rounds in this process with `training.fit` and `aggregate.fedavg` directly."""
    from grid_ipfs import data
    from grid_ipfs.aggregate import fedavg
    from grid_ipfs.payloads import model_from_bytes
    from grid_ipfs.training import evaluate, fit

    model_bytes = task.model_path.read_bytes()
    splits = [data.train_val_split(*data.load_shard(p), VAL_SPLIT, seed=WORKER_SEED) for p in task.shards]
    models = [model_from_bytes(model_bytes) for _ in splits]  # one per worker, as each worker loads its own
    evaluator = model_from_bytes(model_bytes)
    x_test, y_test = data.load_shard(task.test_path)
    weights = [w.copy() for w in evaluator.get_weights()]
    evaluate(evaluator, weights, x_test, y_test)  # the client's genesis evaluation: before round 1, untimed
    round_s, metrics = [], {}
    for r in range(1, task.rounds + 1):
        t0 = time.perf_counter()
        results = []
        for model, (x_tr, y_tr, x_val, y_val) in zip(models, splits):
            if len(x_val):
                evaluate(model, weights, x_val, y_val)
            new_weights, _ = fit(model, weights, x_tr, y_tr, epochs=task.epochs, batch_size=task.batch_size,
                                 seed=WORKER_SEED + r)
            results.append((new_weights, len(x_tr)))
        weights = fedavg(results)
        metrics = evaluate(evaluator, weights, x_test, y_test)
        round_s.append(time.perf_counter() - t0)
    return {"round_s": round_s, "acc": metrics.get("accuracy")}


def run_grid_job(grid, task: Task, head_dir: Path, job_id: str, callbacks: list | None = None) -> dict:
    """One job of `task.rounds` rounds on `grid` by an in-process `Client` on node 0."""
    from grid_ipfs.client import Client, JobSpec
    from grid_ipfs.identity import Identity

    with grid.client(0) as ipfs:
        client = Client(ipfs, Identity.generate(), head_dir=head_dir, callbacks=callbacks or [])
        spec = JobSpec(model_path=task.model_path, rounds=task.rounds, min_workers=len(task.shards),
                       epochs=task.epochs, batch_size=task.batch_size, round_timeout=600.0, join_timeout=JOIN_TIMEOUT,
                       eval_data=task.test_path, job_id=job_id)
        t0 = time.perf_counter()
        result = client.submit(spec)
        submit_s = time.perf_counter() - t0
    round_s = [r.seconds for r in result.rounds]
    critical = [r.metrics.get("critical_path_s") for r in result.rounds]
    coordination = [1 - c / s for c, s in zip(critical, round_s) if c is not None and s > 0]
    return {"round_s": round_s, "acc": result.rounds[-1].metrics.get("val_accuracy"), "submit_s": submit_s,
            "coordination": statistics.fmean(coordination) if coordination else None,
            "join_s": submit_s - sum(round_s), "updates": [r.updates for r in result.rounds]}


def worker_logs_tail(grid, lines: int = 15) -> str:
    out = []
    for i in range(len(grid.workers)):
        tail = grid.worker_log(i).strip().splitlines()[-lines:]
        out.append(f"--- worker{i}\n" + "\n".join(tail))
    return "\n".join(out)


def compare(ctx: common.Context, task: Task, grid_dir: Path) -> dict:
    """Repeats of (grid job, in-process rounds) on one grid; the per-repeat samples, folded."""
    from grid_ipfs.localgrid import LocalGrid

    samples = []
    grid = LocalGrid(grid_dir, task.shards, nodes=len(task.shards))
    grid.start()
    try:
        for rep in range(ctx.repeats):
            job_id = f"bench-{task.name.split('(')[0]}-{rep}-{secrets.token_hex(3)}"
            try:
                g = run_grid_job(grid, task, ctx.workdir / "heads", job_id)
            except BaseException:
                log(f"{NAME}: grid job failed; worker logs:\n{worker_logs_tail(grid)}")
                raise
            p = run_inprocess(task)
            sample = {
                "grid_s_per_round": mean(g["round_s"]), "inprocess_s_per_round": mean(p["round_s"]),
                "grid_steady_s_per_round": mean(g["round_s"][1:]),
                "inprocess_steady_s_per_round": mean(p["round_s"][1:]),
                "grid_first_round_s": g["round_s"][0], "inprocess_first_round_s": p["round_s"][0],
                "grid_acc": g["acc"], "inprocess_acc": p["acc"], "join_s": g["join_s"],
                "coordination": g["coordination"],
            }
            sample["overhead_s_per_round"] = sample["grid_s_per_round"] - sample["inprocess_s_per_round"]
            sample["overhead_steady_s_per_round"] = (sample["grid_steady_s_per_round"]
                                                     - sample["inprocess_steady_s_per_round"])
            sample["overhead_ratio"] = sample["overhead_s_per_round"] / sample["inprocess_s_per_round"]
            sample["acc_diff"] = abs(sample["grid_acc"] - sample["inprocess_acc"])
            samples.append(sample)
            log(f"{task.name} repeat {rep + 1}/{ctx.repeats}: grid {sample['grid_s_per_round']:.3f} s/round "
                f"(acc {sample['grid_acc']:.4f}), in process {sample['inprocess_s_per_round']:.3f} s/round "
                f"(acc {sample['inprocess_acc']:.4f}); rounds grid {[round(x, 2) for x in g['round_s']]} "
                f"in process {[round(x, 2) for x in p['round_s']]}")
    finally:
        grid.stop()
    out = {"task": task.name, "workers": len(task.shards), "rounds": task.rounds}
    out.update(common.fold(samples, ["grid_s_per_round", "inprocess_s_per_round", "overhead_s_per_round",
                                     "grid_acc", "inprocess_acc", "overhead_ratio", "acc_diff", "coordination"]))
    out["detail"] = common.fold(samples, ["grid_steady_s_per_round", "inprocess_steady_s_per_round",
                                          "overhead_steady_s_per_round", "grid_first_round_s",
                                          "inprocess_first_round_s", "join_s"], digits=3)
    out.update(epochs=task.epochs, batch_size=task.batch_size, train_examples=task.train_examples,
               test_examples=task.test_examples, repeats=ctx.repeats)
    return out


def rounds_for(ctx: common.Context) -> int:
    return 3 if ctx.quick else 5


def run(ctx: common.Context) -> dict:
    task = digits_task(ctx.workdir / "task", rounds=rounds_for(ctx))
    ctx.info.update(task.describe())
    result = compare(ctx, task, ctx.workdir / "grid")
    result.pop("overhead_ratio", None)
    for key in ("overhead_ratio_min", "overhead_ratio_max"):
        result.pop(key, None)
    return result


def render(r: dict, ratio: bool = False) -> str:
    header = ["task", "workers", "rounds", "grid s/round", "in-process s/round", "overhead s/round"]
    row = [r["task"], r["workers"], r["rounds"], cell(r, "grid_s_per_round", "{:.3f}"),
           cell(r, "inprocess_s_per_round", "{:.3f}"), cell(r, "overhead_s_per_round", "{:.3f}")]
    if ratio:
        header.append("overhead ratio")
        row.append(cell(r, "overhead_ratio", "{:.3f}"))
    header += ["coordination share", "grid acc", "in-process acc"]
    row += [cell(r, "coordination", "{:.0%}"), cell(r, "grid_acc", "{:.4f}"), cell(r, "inprocess_acc", "{:.4f}")]
    body = table(header, [row])
    d = r["detail"]
    targets = [f"overhead <= {TARGET_OVERHEAD_S} s/round: {verdict(r['overhead_s_per_round'] <= TARGET_OVERHEAD_S)}",
               f"accuracy within {TARGET_ACC_DIFF}: {verdict(r['acc_diff'] <= TARGET_ACC_DIFF)} "
               f"(|diff| {r['acc_diff']:.4f})"]
    steady = table(["", "grid", "in process", "overhead"],
                   [["first round s", cell(d, "grid_first_round_s"), cell(d, "inprocess_first_round_s"), ""],
                    ["rounds 2.. s/round", cell(d, "grid_steady_s_per_round", "{:.3f}"),
                     cell(d, "inprocess_steady_s_per_round", "{:.3f}"),
                     cell(d, "overhead_steady_s_per_round", "{:.3f}")]])
    parallel = ("\n\nA negative overhead means the grid was faster: its workers are separate processes that "
                "train at the same time on the machine's cores, while the in-process rounds train the workers "
                "one after the other." if r["overhead_s_per_round"] < 0 else "")
    return (f"{body}\n\nTargets: {'; '.join(targets)}.{parallel}\n\n{r['train_examples']} training examples in "
            f"{r['workers']} IID shards, {r['epochs']} local epoch(s) of batch {r['batch_size']}, "
            f"{r['test_examples']} held-out examples evaluated every round; median (min–max) over "
            f"{r['repeats']} repeat(s). Round 1 includes Keras tracing the new model on every worker:\n\n{steady}\n\n"
            f"Workers joined the grid job in {cell(d, 'join_s')} s (not part of any round). `coordination share` "
            f"is the part of a grid round outside its critical path (the blocks' `critical_path_s`, the slowest "
            f"worker's own fetch, evaluate, fit and add): announcing, the owner's fetches, aggregating, chaining.")


if __name__ == "__main__":
    sys.exit(common.main_for(sys.modules[__name__]))
