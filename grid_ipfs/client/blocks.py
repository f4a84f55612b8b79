"""The fields of a round's block as the client writes them: the round, its rule, its updates (each
linking the worker's signed message) and metrics, plus the callbacks' own fields under `ext`."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..aggregate import held_out
from ..chain import ChainError
from ..chain.blocks import normalise_ext
from .collect import Collected
from .job import ClientCallback, JobFailed


def round_block(job_id: str, r: int, model_cid: str, weights_cid: str, aggregation: str, params: dict,
                updates: list, metrics: dict) -> dict:
    """A block's fields (signed and linked into the chain by `ChainLog.append`)."""
    return {"job": job_id, "round": r, "model": model_cid, "weights": weights_cid,
            "aggregation": {"name": aggregation, "params": dict(params)}, "updates": updates,
            "metrics": metrics, "time": time.time()}


def callback_fields(callbacks: Sequence[ClientCallback], r: int, weights: list, updates: list,
                    metrics: dict) -> dict:
    """The callbacks' `block_fields` for round `r`, merged: the block's `ext` ({} for none). A bad
    value, or a key two callbacks both set, fails the job."""
    ext: dict = {}
    owner: dict[str, str] = {}  # ext key -> the callback that set it
    for cb in callbacks:
        name = type(cb).__name__
        fields = cb.block_fields(r, [w.copy() for w in weights],
                                 [{**u, "metrics": dict(u["metrics"])} for u in updates], dict(metrics))
        if fields is not None and not isinstance(fields, dict):
            raise JobFailed(f"round {r}: {name}.block_fields returned {type(fields).__name__}, expected a dict or None")
        try:
            fields = normalise_ext(fields)  # numpy values made plain, then checked; {} -> None
        except ChainError as exc:
            raise JobFailed(f"round {r}: {name}.block_fields: {exc}") from None
        for key in fields or {}:
            if key in ext:
                raise JobFailed(f"round {r}: block field ext.{key} is set by both {owner[key]} and {name}")
            owner[key] = name
        ext.update(fields or {})
    return ext


def weighted_metrics(collected: Sequence[Collected]) -> dict:
    """Example-weighted means of the workers' training metrics and of their evaluations of the incoming
    model (`eval_` prefixed), over the metrics every update reports."""
    total = sum(c.update.num_examples for c in collected)
    out: dict[str, float] = {}
    for prefix, attr in (("", "metrics"), ("eval_", "eval_metrics")):
        keys = set.intersection(*(set(getattr(c.update, attr)) for c in collected)) if collected else set()
        for key in sorted(keys):
            out[prefix + key] = sum(getattr(c.update, attr)[key] * c.update.num_examples for c in collected) / total
    return out


def evaluate(model, weights: list, eval_xy) -> dict:
    """The client's evaluation of `weights` on its eval data, as `val_*` metrics ({} without eval data)."""
    if eval_xy is None:
        return {}
    from ..training import evaluate as keras_evaluate

    return held_out(keras_evaluate(model, weights, *eval_xy))
