"""The held-out loss: token-weighted loss per category on a fixed sample of the eval shards.

One measure, three users: the training loop's periodic eval (worker.py), the evaluate stage
(base vs adapter) and promotion (tasks/adapter/promote.py), so their numbers compare. It lives with
training, below the evaluate stage: evaluate imports the train package (the run directory), never
the other way round.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tasks.core.config import CATEGORIES


def load_eval_sets(tok_dir: Path) -> dict[str, Any]:
    from tasks.tokenize.loader import PackedShards

    out = {}
    for cat in CATEGORIES:
        d = tok_dir / "eval" / cat
        if d.is_dir() and any(d.glob("shard-*.arrow")):
            out[cat] = PackedShards(d)
    return out


def shard_rows(n: int, rank: int, world: int) -> list[int]:
    """This rank's share of a fixed sample of ``n`` rows: every ``world``-th row from ``rank``. The
    shares are disjoint, cover the sample, and differ in size by at most one row."""
    return list(range(rank, n, world))


def _lockstep_batches(n: int, batch_size: int, rank: int, world: int):
    """This rank's share of rows 0..n-1 in batches, as (row indices, real). Every rank yields the same
    number of batches (FSDP's forward is a collective: a rank that stopped early would hang the
    others); a rank whose share has run out yields a filler batch (real=False) to run and discard."""
    mine = shard_rows(n, rank, world)
    per_rank = -(-n // world)  # the largest share
    for b in range(-(-per_rank // batch_size)):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        yield (idx, True) if idx else ([0], False)


def eval_loss_sums(model, eval_sets: dict[str, Any], rows: int | dict[str, int], batch_size: int, device,
                   rank: int = 0, world: int = 1) -> dict[str, tuple[float, float]]:
    """(summed per-token loss, predicted tokens) per category over this rank's share of the first
    ``rows`` rows of each held-out stream. Sums, not means, so the ranks' shares add up exactly."""
    import torch

    from tasks.tokenize.loader import collate

    was_training = model.training
    model.eval()
    out: dict[str, tuple[float, float]] = {}
    with torch.no_grad():
        for cat, shards in eval_sets.items():
            n = min(len(shards), rows[cat] if isinstance(rows, dict) else rows)
            loss_sum = tokens = 0.0
            for idx, real in _lockstep_batches(n, batch_size, rank, world):
                batch = {k: v.to(device) for k, v in collate(shards.rows(idx)).items()}
                # HF shifts labels by one: the predicted tokens are labels[:, 1:] that are not -100
                k = int((batch["labels"][:, 1:] != -100).sum())
                if k == 0 and world == 1:
                    continue
                loss = model(**batch, use_cache=False).loss.float().item()
                if real and k:
                    loss_sum += loss * k
                    tokens += k
            out[cat] = (loss_sum, tokens)
    if was_training:
        model.train()
    return out


def reduce_loss_sums(sums: dict[str, tuple[float, float]], all_reduce, device) -> dict[str, tuple[float, float]]:
    """Add every rank's sums (``all_reduce``: a sum over ranks of a tensor, e.g. accelerate's
    ``reduce(t, "sum")``). Float64, so the total does not depend on how the rows were split. The
    categories come in the same order on every rank (load_eval_sets' order)."""
    import torch

    t = torch.tensor([list(v) for v in sums.values()], dtype=torch.float64, device=device).reshape(-1, 2)
    t = all_reduce(t).cpu().tolist()
    return {cat: (ls, tk) for cat, (ls, tk) in zip(sums, t)}


def summarize_losses(sums: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Token-weighted mean loss and perplexity per category and overall."""
    cats: dict[str, dict[str, float]] = {}
    tot_loss = tot_tok = 0.0
    for cat, (loss_sum, tokens) in sums.items():
        if tokens:
            cats[cat] = {"loss": loss_sum / tokens, "ppl": math.exp(min(loss_sum / tokens, 50)), "tokens": int(tokens)}
            tot_loss += loss_sum
            tot_tok += tokens
    overall = {"loss": tot_loss / tot_tok, "ppl": math.exp(min(tot_loss / tot_tok, 50)), "tokens": int(tot_tok)} if tot_tok else {}
    return {"categories": cats, "overall": overall}


def eval_losses(model, eval_sets: dict[str, Any], max_rows: int | dict[str, int], batch_size: int, device,
                rank: int = 0, world: int = 1, all_reduce=None) -> dict[str, Any]:
    """Token-weighted mean loss per category over the first ``max_rows`` rows of each held-out
    stream (a fixed sample, so numbers are comparable across steps and between base and adapter).
    With ``world`` > 1 each rank evaluates its share and ``all_reduce`` adds the sums, so every rank
    gets the result of the whole sample at 1/world of the cost."""
    sums = eval_loss_sums(model, eval_sets, max_rows, batch_size, device, rank, world)
    if all_reduce is not None:
        sums = reduce_loss_sums(sums, all_reduce, device)
    return summarize_losses(sums)


def row_losses(model, eval_sets: dict[str, Any], rows: int, device, rank: int = 0, world: int = 1) -> dict[str, list[float]]:
    """Mean loss of each of this rank's share of the first ``rows`` rows per category (one row per
    forward): the spread that sizes the periodic-eval sample (see rows_for_standard_error)."""
    import torch

    from tasks.tokenize.loader import collate

    was_training = model.training
    model.eval()
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        for cat, shards in eval_sets.items():
            vals = []
            for idx, real in _lockstep_batches(min(len(shards), rows), 1, rank, world):
                batch = {k: v.to(device) for k, v in collate(shards.rows(idx)).items()}
                k = int((batch["labels"][:, 1:] != -100).sum())
                loss = model(**batch, use_cache=False).loss.float().item()
                if real and k:
                    vals.append(loss)
            out[cat] = vals
    if was_training:
        model.train()
    return out


def rows_for_standard_error(row_loss_std: float, target_se: float) -> int:
    """Rows whose mean loss has a standard error of at most ``target_se``: SE = std / sqrt(n), so
    n = ceil((std / target_se)^2). Rows are packed, nearly equal in tokens, so the row mean stands for
    the token-weighted mean. Conservative for early stopping: every evaluation reads the same rows, so
    the change between two evaluations (a paired difference) is measured more precisely than this."""
    if target_se <= 0:
        raise ValueError(f"target standard error must be > 0, got {target_se}")
    return max(1, math.ceil((row_loss_std / target_se) ** 2))
