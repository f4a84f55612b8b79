"""profile: where a grid round's time goes, from pyinstrument on the client and on one worker.

The digits task of `overhead` (3 nodes, 3 workers) runs one job; the client runs in this process under
pyinstrument, worker 0 runs under pyinstrument through `benchmarks.probe worker`. Reported per round:
seconds in each grid_ipfs step (outermost calls of the named function, so nested steps overlap their
parents) and the call tree under `Client._run_round` / `Worker.train_round`. Full text profiles go to
`benchmarks/profiles/` (not committed). The sampling profilers slow both sides a little: these numbers
explain the other benchmarks, they are not themselves a speed figure.
"""

from __future__ import annotations

import json
import secrets
import statistics
import sys
from pathlib import Path

from benchmarks import common
from benchmarks.common import log, table
from benchmarks.overhead import digits_task, run_grid_job, worker_logs_tail

NAME = "profile"
DEFAULT_REPEATS = (1, 1)
PROFILES_DIR = common.BENCH_DIR / "profiles"


def profiled_grid_class():
    from grid_ipfs.localgrid import LocalGrid

    class ProfiledGrid(LocalGrid):
        """A LocalGrid whose worker 0 runs `grid_ipfs.worker` under pyinstrument (benchmarks.probe)."""

        profile_out: Path

        def worker_command(self, i: int, extra_args: list[str] | None = None) -> list[str]:
            command = super().worker_command(i, extra_args)
            if i != 0 or "grid_ipfs.worker" not in command:
                return command
            at = command.index("grid_ipfs.worker")
            return [*command[:at], "benchmarks.probe", "worker", "--out", str(self.profile_out), "--",
                    *command[at + 1:]]

    return ProfiledGrid


WORKER_PROFILE_TIMEOUT = 180.0
"""Seconds worker 0 gets after SIGTERM to write its profile."""


def run(ctx: common.Context) -> dict:
    from pyinstrument import Profiler

    from benchmarks import profiling

    rounds = 3 if ctx.quick else 5
    task = digits_task(ctx.workdir / "task", rounds=rounds)
    ctx.info.update(task.describe())
    grid_class = profiled_grid_class()
    grid = grid_class(ctx.workdir / "grid", task.shards, nodes=len(task.shards))
    grid.profile_out = ctx.workdir / "worker0-profile"
    profiler = Profiler(interval=0.001)
    grid.start()
    try:
        profiler.start()
        try:
            job = run_grid_job(grid, task, ctx.workdir / "heads", f"bench-profile-{secrets.token_hex(3)}")
        finally:
            profiler.stop()
    except BaseException:
        log(f"{NAME}: grid job failed; worker logs:\n{worker_logs_tail(grid)}")
        raise
    finally:
        # worker 0 renders and writes its profile as it exits, which on a loaded machine can take longer
        # than the grid's usual 20 s before SIGKILL (the cause of a missing worker0-profile.txt)
        grid.stop_worker(0, timeout=WORKER_PROFILE_TIMEOUT)
        grid.stop()
    root = profiler.last_session.root_frame()
    client_steps = profiling.breakdown(root, profiling.CLIENT_STEPS)
    client_tree = profiling.subtree_text(root, "_run_round", "grid_ipfs/client/core.py")
    worker_file = grid.profile_out.with_suffix(".json")
    if not worker_file.is_file():
        raise RuntimeError(f"worker 0 wrote no profile ({worker_file}); its log:\n{grid.worker_log(0)[-3000:]}")
    worker = json.loads(worker_file.read_text())
    PROFILES_DIR.mkdir(exist_ok=True)
    (PROFILES_DIR / "client.txt").write_text(profiler.output_text(unicode=False, color=False))
    (PROFILES_DIR / "worker0.txt").write_text(grid.profile_out.with_suffix(".txt").read_text())
    per_round = lambda steps: {k: round(v / rounds, 4) for k, v in steps.items()}  # noqa: E731
    return {"task": task.name, "workers": len(task.shards), "rounds": rounds,
            "grid_s_per_round": round(statistics.fmean(job["round_s"]), 3),
            "round_s": [round(x, 3) for x in job["round_s"]],
            "client_s_per_round": per_round(client_steps), "worker0_s_per_round": per_round(worker["steps"]),
            "client_tree": client_tree, "worker0_tree": worker["tree"],
            "files": [str(p.relative_to(common.REPO)) for p in (PROFILES_DIR / "client.txt",
                                                                 PROFILES_DIR / "worker0.txt")]}


def render(r: dict) -> str:
    def steps_table(steps: dict) -> str:
        return table(["step", "s per round"], [[k, f"{v:.3f}"] for k, v in steps.items()])

    rounds = ", ".join(f"{x:.2f}" for x in r["round_s"])
    summary = []
    for who, key in (("client", "client_s_per_round"), ("worker 0", "worker0_s_per_round")):
        steps = r[key]
        labels = list(steps)
        whole = steps[labels[0]]
        leaves = [(v, k) for k, v in steps.items() if k != labels[0] and "collect updates" not in k
                  and "close round" not in k and not k.endswith("once)")]
        top = ", ".join(f"{k} {v:.2f} s ({v / whole:.0%})" for v, k in sorted(leaves, reverse=True)[:3] if whole)
        summary.append(f"- {who}: a round takes {whole:.2f} s on its side; most of it: {top}.")
    parts = [
        f"{r['task']}, {r['workers']} workers, {r['rounds']} rounds under the profiler (rounds took {rounds} s). "
        "Steps are the outermost calls of each function inside the round, so a step's time includes the "
        "steps nested in it.",
        "\n".join(summary),
        f"Client (in-process `Client`, node 0):\n\n{steps_table(r['client_s_per_round'])}",
        f"Worker 0 (`python -m grid_ipfs.worker` under pyinstrument):\n\n{steps_table(r['worker0_s_per_round'])}",
        f"Call tree under `Client._run_round` (all rounds, frames merged by function):\n\n```\n{r['client_tree']}\n```",
        f"Call tree under `Worker.train_round` (all rounds):\n\n```\n{r['worker0_tree']}\n```",
        f"Full profiles: {', '.join(f'`{f}`' for f in r['files'])}.",
    ]
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(common.main_for(sys.modules[__name__]))
