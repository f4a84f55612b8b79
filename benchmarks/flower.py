"""flower: the tasks of `overhead` (digits MLP) and `overhead_cnn` (Fashion-MNIST CNN) on Flower, against the grid.

Same model file, shards, held-out set, rounds, epochs, batch size and seeds as those benchmarks.
Flower runs as its deployment-style legacy API needs no extra service: `flwr.server.start_server` and three
`flwr.client.start_client` processes over gRPC on 127.0.0.1 (`benchmarks.flower_app`). Its Ray-based
simulation is not used (an extra heavy dependency, and it runs clients as actors, not as processes like
the grid's workers). `s_per_round` is the mean round time on the server (clients sampled -> new global
model evaluated). Each repeat runs Flower and then a fresh job on a grid of the same shape (`paired`), and
`ratio_grid_over_flower` is the median of the per-pair ratios of seconds per round. Target: ratio <= 1.0
on each task.

Flower lives in its own small environment, `benchmarks/.venv-flwr`, layered over the project's venv
(a `.pth` file adds `.venv`'s site-packages after its own): installing `flwr` into `.venv` would downgrade
protobuf, rich and packaging under everything else. It is created on first use with pip (PyPI); set
`GRID_BENCH_FLWR_PYTHON` to use another interpreter that has flwr.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from benchmarks import common, overhead
from benchmarks.common import cell, log, table, verdict
from grid_ipfs.ipfs.devnet import free_port

NAME = "flower"
DEFAULT_REPEATS = (3, 2)
FLWR_VERSION = "1.41.0"
TARGET_RATIO = 1.0
"""Issue 14: the grid's seconds per round no more than Flower's, on each task."""
OVERLAY = common.BENCH_DIR / ".venv-flwr"


def _has_flwr(python: str) -> str | None:
    """flwr's version under `python`, or None."""
    try:
        out = subprocess.run([python, "-c", "import flwr; print(flwr.__version__)"], capture_output=True,
                             text=True, timeout=120, env=common.child_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def flwr_python(info: dict) -> str:
    """An interpreter that imports flwr and grid_ipfs; creates the overlay environment if need be."""
    override = os.environ.get("GRID_BENCH_FLWR_PYTHON")
    if override:
        if not _has_flwr(override):
            raise RuntimeError(f"GRID_BENCH_FLWR_PYTHON={override} cannot import flwr")
        info["flwr_env"] = f"GRID_BENCH_FLWR_PYTHON={override}"
        return override
    if _has_flwr(sys.executable):
        info["flwr_env"] = "the project venv"
        return sys.executable
    python = OVERLAY / "bin" / "python"
    if python.exists() and _has_flwr(str(python)):
        info["flwr_env"] = str(OVERLAY.relative_to(common.REPO))
        return str(python)
    log(f"flower: creating {OVERLAY} (flwr=={FLWR_VERSION} over the project venv; once)")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(OVERLAY)], check=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    main_site = sysconfig.get_paths()["purelib"]  # this (project) interpreter's site-packages
    Path(site, "zz_grid_ipfs_project_venv.pth").write_text(f"import site; site.addsitedir({main_site!r})\n")
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           f"flwr=={FLWR_VERSION}"], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"pip install flwr=={FLWR_VERSION} failed: {(done.stderr or done.stdout)[-800:]}")
    if not _has_flwr(str(python)):
        raise RuntimeError(f"flwr installed into {OVERLAY} but does not import")
    info["flwr_env"] = f"{OVERLAY.relative_to(common.REPO)} (created by this run)"
    return str(python)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Flower server exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"Flower server not listening on port {port} after {timeout:.0f}s")


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def run_flower(python: str, task: overhead.Task, directory: Path, timeout: float = 1200.0,
               cpu: common.CpuSampler | None = None) -> dict:
    """One Flower run of the task: server + one client process per shard. Stopped by PID in all cases.
    With `cpu`, its processes are watched as "server" and "clients"."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    out = directory / "server.json"
    env = common.child_env()
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        server_log = directory / "server.log"
        logs.append(server_log)
        with open(server_log, "wb") as f:
            server = subprocess.Popen(
                [python, "-m", "benchmarks.flower_app", "server", "--port", str(port), "--model",
                 str(task.model_path), "--test", str(task.test_path), "--workers", str(len(task.shards)),
                 "--rounds", str(task.rounds), "--epochs", str(task.epochs), "--batch-size", str(task.batch_size),
                 "--out", str(out)], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=common.REPO)
        procs.append(server)
        if cpu is not None:
            cpu.watch("server", server.pid)
        _wait_port(port, server, timeout=180)
        for i, shard in enumerate(task.shards):
            client_log = directory / f"client{i}.log"
            logs.append(client_log)
            with open(client_log, "wb") as f:
                procs.append(subprocess.Popen(
                    [python, "-m", "benchmarks.flower_app", "client", "--port", str(port), "--model",
                     str(task.model_path), "--shard", str(shard), "--val-split", str(overhead.VAL_SPLIT),
                     "--seed", str(overhead.WORKER_SEED)], stdout=f, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, env=env, cwd=common.REPO))
            if cpu is not None:
                cpu.watch("clients", procs[-1].pid)
        try:
            server.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"Flower server still running after {timeout:.0f}s") from None
        if server.returncode != 0 or not out.is_file():
            raise RuntimeError(f"Flower server failed (exit {server.returncode}):\n{_tail(server_log)}")
        for proc in procs[1:]:  # clients leave when the server ends the session
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
    except BaseException:
        for path in logs:
            log(f"flower: {path.name}:\n{_tail(path)}")
        raise
    finally:
        for proc in procs:
            common.stop_process(proc, timeout=10)
    record = json.loads(out.read_text())
    rounds = [r for r in record["rounds"] if r["round"] >= 1]
    round_s = [r["end"] - r["start"] for r in rounds]
    if len(round_s) != task.rounds:
        raise RuntimeError(f"Flower ran {len(round_s)} of {task.rounds} rounds")
    return {"flwr_version": record["flwr_version"], "round_s": round_s, "acc": rounds[-1]["accuracy"],
            "later_rounds": (rounds[1]["start"], rounds[-1]["end"]) if len(rounds) > 1 else None}


def paired(ctx: common.Context, python: str, task: overhead.Task) -> list[dict]:
    """Flower and the grid taking turns on `task`, one repeat of each at a time, so that each pair ran
    under the same conditions: this host's speed drifts by tens of percent within minutes, which
    measuring all of one and then all of the other would put into the ratio. One grid (daemons and
    workers started once, idle while Flower runs) serves every repeat, each a fresh job."""
    from grid_ipfs.localgrid import LocalGrid

    samples = []
    grid = LocalGrid(ctx.workdir / f"grid-{task.name}", task.shards, nodes=len(task.shards))
    grid.start()
    try:
        for rep in range(ctx.repeats):
            with common.CpuSampler() as flwr_cpu:
                flwr = run_flower(python, task, ctx.workdir / f"flower-{task.name}-{rep}", cpu=flwr_cpu)
            job_id = f"bench-flower-{task.name}-{rep}-{secrets.token_hex(3)}"
            rounds_end = round_ends()
            try:
                with common.CpuSampler() as grid_cpu:
                    for node in grid.devnet.nodes:
                        grid_cpu.watch("daemons", node.pid)
                    for proc in grid.workers:
                        grid_cpu.watch("workers", proc.pid)
                    grid_cpu.watch("owner", os.getpid())
                    ours = overhead.run_grid_job(grid, task, ctx.workdir / "heads", job_id, callbacks=[rounds_end])
            except BaseException:
                log(f"{NAME}: grid job failed; worker logs:\n{overhead.worker_logs_tail(grid)}")
                raise
            sample = {"s_per_round": statistics.fmean(flwr["round_s"]), "acc": flwr["acc"],
                      "grid_s_per_round": statistics.fmean(ours["round_s"]), "grid_acc": ours["acc"],
                      "flwr_version": flwr["flwr_version"],
                      **cpu_per_round("flower_cpu", flwr_cpu, flwr["later_rounds"], task.rounds - 1),
                      **cpu_per_round("grid_cpu", grid_cpu, rounds_end.later_rounds(), task.rounds - 1)}
            sample["ratio"] = sample["grid_s_per_round"] / sample["s_per_round"]
            samples.append(sample)
            log(f"flower {task.name} repeat {rep + 1}/{ctx.repeats}: Flower {sample['s_per_round']:.3f} s/round "
                f"(rounds {[round(x, 2) for x in flwr['round_s']]}), grid {sample['grid_s_per_round']:.3f} "
                f"(rounds {[round(x, 2) for x in ours['round_s']]}): {sample['ratio']:.2f}")
    finally:
        grid.stop()
    return samples


def round_ends():
    """A client callback noting when each round ends (perf_counter), for `CpuSampler.between`; its
    `later_rounds()` spans rounds 2.. (past Keras' first traces)."""
    from grid_ipfs.client import ClientCallback

    class RoundEnds(ClientCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_round_end(self, result) -> None:
            self.ends.append(time.perf_counter())

        def later_rounds(self) -> tuple[float, float] | None:
            return (self.ends[0], self.ends[-1]) if len(self.ends) > 1 else None

    return RoundEnds()


def cpu_per_round(prefix: str, cpu: common.CpuSampler, window: tuple[float, float] | None, rounds: int) -> dict:
    """`{prefix_GROUP: CPU s per round, prefix: their sum}` over `window` (rounds 2..); {} without one."""
    if window is None or rounds < 1:
        return {}
    spent = {f"{prefix}_{group}": seconds / rounds for group, seconds in cpu.between(*window).items()}
    return {**spent, prefix: sum(spent.values())}


def tasks(ctx: common.Context) -> tuple[list[overhead.Task], str | None]:
    """The digits MLP of `overhead` and, when its data set is installed, the Fashion-MNIST CNN of
    `overhead_cnn` (same sizes); else why the CNN is not run."""
    from benchmarks import overhead_cnn
    from grid_ipfs.data import DataError

    out = [overhead.digits_task(ctx.workdir / "task", rounds=overhead.rounds_for(ctx))]
    n_train, n_test, rounds = overhead_cnn.SIZES[ctx.quick]
    try:
        cnn = overhead_cnn.fashion_task(ctx.workdir / "task-cnn", overhead_cnn.fashion_root(), n_train, n_test,
                                        rounds)
    except DataError as exc:
        return out, f"fashion_cnn: {exc}"
    return [*out, cnn], None


CPU_KEYS = ["flower_cpu", "flower_cpu_clients", "flower_cpu_server",
            "grid_cpu", "grid_cpu_workers", "grid_cpu_owner", "grid_cpu_daemons"]


def run(ctx: common.Context) -> dict:
    try:
        python = flwr_python(ctx.info)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return {"skipped": f"Flower could not be installed or imported here: {exc}"}
    chosen, not_run = tasks(ctx)
    rows = []
    for task in chosen:
        samples = paired(ctx, python, task)
        row = {"flwr_version": samples[-1]["flwr_version"],
               **common.fold(samples, ["s_per_round", "acc", "grid_s_per_round", "grid_acc", "ratio",
                                       *CPU_KEYS])}
        for suffix in ("", "_min", "_max"):
            row[f"ratio_grid_over_flower{suffix}"] = row.pop(f"ratio{suffix}")
        row.update(grid_source="paired", task=task.name, workers=len(task.shards), rounds=task.rounds,
                   epochs=task.epochs, batch_size=task.batch_size, repeats=ctx.repeats)
        rows.append(row)
    out = {"rows": rows, "transport": "flwr.server.start_server + flwr.client.start_client, gRPC on 127.0.0.1",
           "environment": ctx.info.get("flwr_env")}
    return {**out, "not_run": not_run} if not_run else out


def flower_rows(r: dict) -> list[dict]:
    """The per-task rows of a result (one flat row in results written before the CNN was added)."""
    return r["rows"] if "rows" in r else [r]


def render(r: dict) -> str:
    rows = flower_rows(r)
    body = table(["Flower", "task", "workers", "rounds", "Flower s/round", "Flower acc", "grid s/round",
                  "grid / Flower", f"target <= {TARGET_RATIO:g}"],
                 [[row["flwr_version"], row["task"], row["workers"], row["rounds"],
                   cell(row, "s_per_round", "{:.3f}"), cell(row, "acc", "{:.4f}"),
                   cell(row, "grid_s_per_round", "{:.3f}"),
                   cell(row, "ratio_grid_over_flower"), verdict(row["ratio_grid_over_flower"] <= TARGET_RATIO)]
                  for row in rows])
    not_run = f"\n\nNot run: {r['not_run']}." if r.get("not_run") else ""
    if all(row.get("grid_source") == "paired" for row in rows):
        method = ("Each repeat runs Flower and then a fresh grid job (one grid of 3 nodes and 3 worker processes "
                  "per task), so each pair shares the host's conditions; `grid / Flower` is the median of the "
                  f"per-pair ratios, over {rows[0]['repeats']} repeat(s).")
    else:
        method = ("Grid figures: " + "; ".join(f"{row['task']} from {row['grid_source']}" for row in rows)
                  + "; the grid/Flower ratio uses the medians.")
    cpu = ""
    if any(row.get("grid_cpu") is not None for row in rows):
        cpu = "\n\n" + table(
            ["task", "Flower CPU s/round", "clients", "server", "grid CPU s/round", "workers", "owner", "daemons"],
            [[row["task"], *(cell(row, key) for key in CPU_KEYS)] for row in rows]) + (
            "\n\nCPU seconds (user + system, from /proc) of every process of each side per round, over rounds "
            "2.., median (min–max) over the repeats. All of them share this machine's cores, so a round takes at "
            "least its CPU seconds over the number of cores.")
    return (f"{body}{not_run}\n\nFlower {rows[0]['flwr_version']} via {r['transport']} ({r['environment']}); "
            f"same model file, shards, seeds, epochs and batch size as the grid, per-round evaluation on each "
            f"client's validation split and of the global model on the held-out set. {method}{cpu}")


if __name__ == "__main__":
    sys.exit(common.main_for(sys.modules[__name__]))
