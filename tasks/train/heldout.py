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


def eval_losses(model, eval_sets: dict[str, Any], max_rows: int, batch_size: int, device) -> dict[str, Any]:
    """Token-weighted mean loss per category over the first ``max_rows`` rows of each held-out
    stream (a fixed sample, so numbers are comparable across steps and between base and adapter)."""
    import torch

    from tasks.tokenize.loader import collate

    was_training = model.training
    model.eval()
    cats: dict[str, dict[str, float]] = {}
    tot_loss = tot_tok = 0.0
    with torch.no_grad():
        for cat, shards in eval_sets.items():
            n = min(len(shards), max_rows)
            loss_sum = tokens = 0.0
            for start in range(0, n, batch_size):
                batch = {k: v.to(device) for k, v in collate(shards.rows(range(start, min(start + batch_size, n)))).items()}
                # HF shifts labels by one: the predicted tokens are labels[:, 1:] that are not -100
                k = int((batch["labels"][:, 1:] != -100).sum())
                if k == 0:
                    continue
                loss = model(**batch, use_cache=False).loss.float().item()
                loss_sum += loss * k
                tokens += k
            if tokens:
                cats[cat] = {"loss": loss_sum / tokens, "ppl": math.exp(min(loss_sum / tokens, 50)), "tokens": int(tokens)}
                tot_loss += loss_sum
                tot_tok += tokens
    if was_training:
        model.train()
    overall = {"loss": tot_loss / tot_tok, "ppl": math.exp(min(tot_loss / tot_tok, 50)), "tokens": int(tot_tok)} if tot_tok else {}
    return {"categories": cats, "overall": overall}
