"""The step plan: how many optimizer steps, warmup and eval points a run has. One function, used by
the worker, the stage, the flows and `d2a plan`."""

from __future__ import annotations

import math
from typing import Any


def world_size(tc) -> int:
    """Processes of a run: train.num_processes per node x train.nnodes."""
    return tc.num_processes * tc.nnodes


def plan_steps(tc, rows: int, seq_len: int, world: int | None = None) -> dict[str, Any]:
    """The step plan of a run: the schedule's clock is the optimizer step, and every step trains on
    exactly tokens_per_step tokens, so token budgets convert to steps once, here, and warmup,
    cosine decay, eval/save cadence and the ETA all follow tokens seen. ``rows`` = packed training
    rows; ``world`` = processes (default: the config's num_processes x nnodes; the worker passes
    the world it was launched with).

    The length comes from the first of train.max_steps, train.max_tokens (the token budget: that
    many tokens, in as many epochs as it takes) and train.epochs; ``limit`` says which. Early
    stopping (train.early_stopping) can end a run sooner: total_steps is the most it will run."""
    world = world_size(tc) if world is None else world
    mb, accum = tc.micro_batch_size, tc.grad_accum
    batches_per_epoch = rows // world // mb  # micro-batches per rank per epoch (PackedShards.batches)
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{rows} packed rows cannot fill one step of {world}x{mb}x{accum} rows")
    tokens_per_step = mb * accum * world * seq_len

    def to_steps(tokens: int | None, steps: int) -> int:
        return steps if tokens is None else math.ceil(tokens / tokens_per_step)

    if tc.max_steps:
        total, limit = tc.max_steps, "max_steps"
    elif tc.max_tokens:
        total, limit = math.ceil(tc.max_tokens / tokens_per_step), "max_tokens"
    else:
        total, limit = math.ceil(tc.epochs * steps_per_epoch), "epochs"
    eval_every = max(1, to_steps(tc.eval_every_tokens, tc.eval_every))
    return {"total_steps": total, "warmup_steps": to_steps(tc.warmup_tokens, tc.warmup_steps),
            "eval_every": eval_every, "save_every": max(1, to_steps(tc.save_every_tokens, tc.save_every)),
            "tokens_per_step": tokens_per_step, "steps_per_epoch": steps_per_epoch,
            "batches_per_epoch": batches_per_epoch, "world_size": world, "limit": limit,
            "total_tokens": total * tokens_per_step, "epochs": total / steps_per_epoch,
            "evals": math.ceil(total / eval_every)}
