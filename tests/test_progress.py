"""The live progress display (`grid_ipfs.progress.RichProgress`) driven through its ClientCallback hooks,
rendered into a string: rounds, and tries the acceptance rule rejected."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace

from rich.console import Console

from grid_ipfs.client import JobResult, RoundResult
from grid_ipfs.progress import RichProgress, rejected_line

WHY = "val_accuracy 0.41 fails val_accuracy>=0.6"


def result(round: int, tries: int, val_accuracy: float, accepted: bool = True) -> RoundResult:
    return RoundResult(round=round, weights=f"w{round}.{tries}", head=f"h{round}.{tries}", updates=3,
                       metrics={"loss": 0.5, "accuracy": 0.8, "val_loss": 0.9, "val_accuracy": val_accuracy},
                       seconds=1.25, accepted=accepted, tries=tries)


def run(events, config: dict | None = None) -> str:
    out = io.StringIO()
    progress = RichProgress(Console(file=out, width=120, force_terminal=False, color_system=None))
    progress.on_job_start(SimpleNamespace(job="job-1", model="bafymodel", config=config or {}), "bafygenesis")
    for event in events:
        event(progress)
    progress.on_job_end(JobResult(job="job-1", model="bafymodel", head="h-last", weights="w-last"))
    return out.getvalue()


def test_a_reason_with_markup_and_newlines_is_shown_as_written_on_one_line_and_only_the_last_five():
    """A reason can quote a peer's text (a contest's verdicts name miners and what they sent): under the
    table it reads literally, rich markup and all, one line per try, and at most five lines."""
    hostile = "miner: [bold red]x[/] [/y]\nround 9 accepted"
    events = [lambda p, i=i: p.on_round_rejected(result(1, i, 0.41, accepted=False), hostile) for i in range(1, 8)]
    text = run([lambda p: p.on_round_start(1, 3, time.time() + 60), *events])
    table = text[text.rindex("job job-1"):text.rindex("done: head")]  # the final render of the live table
    shown = [line.strip() for line in table.splitlines() if " rejected: " in line]
    assert shown == [f"round 1 try {i} rejected: miner: [bold red]x[/] [/y]\\nround 9 accepted"
                     for i in range(3, 8)], table
    assert "round 9 accepted" not in [line.strip() for line in table.splitlines()], table
    assert rejected_line(result(3, 2, 0.41, accepted=False), WHY).startswith("round 3 try 2 rejected: ")


def test_a_rejected_try_is_a_row_of_its_own_with_the_reason_under_the_table():
    deadline = time.time() + 60
    text = run([
        lambda p: p.on_round_start(1, 3, deadline),
        lambda p: p.on_update(1, "worker-a", 1, 3),
        lambda p: p.on_round_rejected(result(1, 1, 0.41, accepted=False), WHY),
        lambda p: p.on_round_start(1, 3, deadline),
        lambda p: p.on_round_end(result(1, 2, 0.72)),
        lambda p: p.on_round_start(2, 3, deadline),
        lambda p: p.on_round_end(result(2, 1, 0.80)),
    ])
    table = text[text.rindex("job job-1"):]  # the final render of the live table
    rows = [line for line in table.splitlines() if "1.2" in line]  # the rows of finished tries
    assert len(rows) == 3, table
    assert "1 ✗" in rows[0] and "0.4100" in rows[0], table  # the rejected try, first, marked
    assert "✗" not in rows[1] and "0.7200" in rows[1] and "0.8000" in rows[2], table
    assert f"round 1 try 1 rejected: {WHY}" in table
    assert "done" in text and "h-last" in text


def test_without_rejections_there_is_no_mark_and_no_caption():
    text = run([lambda p: p.on_round_start(1, 3, time.time() + 60), lambda p: p.on_round_end(result(1, 1, 0.7))])
    assert "✗" not in text and "rejected" not in text
    assert "0.7000" in text


def test_an_async_job_shows_blocks_with_their_staleness_and_the_updates_per_minute():
    def block(r: int, mean: float, most: float) -> RoundResult:
        done = result(r, 1, 0.7)
        done.metrics.update(staleness_mean=mean, staleness_max=most)
        return done

    text = run([lambda p: p.on_round_start(1, 2, time.time() + 60), lambda p: p.on_round_end(block(1, 0.0, 0.0)),
                lambda p: p.on_round_start(2, 2, time.time() + 60), lambda p: p.on_round_end(block(2, 1.5, 3.0))],
               config={"mode": "async"})
    table = text[text.rindex("job job-1"):]
    header = next(line for line in table.splitlines() if "updates/min" in line)
    assert "block" in header and "staleness" in header and "round" not in header, table
    rows = [[cell.strip() for cell in line.strip("│┃ ").split("│")] for line in table.splitlines() if "1.2" in line]
    assert [row[:3] for row in rows] == [["1", "3", "0.0/0"], ["2", "3", "1.5/3"]], table
    assert all(float(row[3]) > 0 for row in rows), table  # updates per minute so far


def test_a_synchronous_job_keeps_its_round_columns():
    text = run([lambda p: p.on_round_end(result(1, 1, 0.7))])
    assert "updates/min" not in text and "staleness" not in text
