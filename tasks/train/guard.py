"""The divergence guard and rollback.

A step whose loss or gradient is not finite anywhere, or whose loss spikes, is skipped on every rank
(no update; the decision comes from one all-reduce, so DDP replicas never drift apart). Too many bad
steps in a row, or any spike, is divergence: the worker either rolls back -- it exits with
EXIT_ROLLBACK after writing ``rollback.json``, and the relaunch reloads the newest good checkpoint but
takes the data from where the divergence happened, so the bad batches are not replayed -- or stops
with ``diverged.json`` saying why.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.manifest import write_json_atomic
from tasks.train.supervisor import DIVERGED_FILE, EXIT_DIVERGED, EXIT_ROLLBACK, ROLLBACK_FILE


@dataclass
class Guard:
    """The guard's memory; ``skipped`` and ``rollbacks`` are saved in every checkpoint."""

    tc: Any  # TrainConfig: max_bad_steps, spike_factor, spike_window, on_divergence, ...
    skipped: int = 0
    rollbacks: int = 0
    bad_in_row: int = 0
    recent: deque = field(default_factory=deque)  # the last good losses (the spike test's running mean)
    # LR factor applied on top of the newest checkpoint's schedule: rollbacks to the same checkpoint
    # compound, and a newer checkpoint (which saved the lowered schedule) resets it to 1
    lr_factor_vs_ck: float = 1.0

    def __post_init__(self) -> None:
        self.recent = deque(self.recent, maxlen=self.tc.spike_window)

    def judge(self, nonfinite: bool, loss: float) -> tuple[str | None, str | None]:
        """After the all-reduce: (why this step is skipped, why training has diverged); None = no.
        The same inputs on every rank give the same answer on every rank."""
        tc, recent = self.tc, self.recent
        spike = (not nonfinite and tc.spike_factor is not None and len(recent) == recent.maxlen
                 and loss > tc.spike_factor * sum(recent) / len(recent))
        if not (nonfinite or spike):
            self.bad_in_row = 0
            recent.append(loss)
            return None, None
        self.skipped += 1
        self.bad_in_row += 1
        reason = "non-finite loss/gradient" if nonfinite else f"loss spike {loss:.3g} > {tc.spike_factor} x running mean"
        if spike:  # a spike is a sign, not noise: divergence at once
            return reason, reason
        if self.bad_in_row >= tc.max_bad_steps:
            return reason, f"{self.bad_in_row} non-finite steps in a row"
        return reason, None


def pending_rollback(run_dir: Path, ck: Path | None) -> dict[str, Any] | None:
    """The rollback this launch must carry out: ``rollback.json`` when it names the checkpoint being
    resumed (a newer checkpoint means that rollback is history)."""
    p = run_dir / ROLLBACK_FILE
    if not p.is_file():
        return None
    rb = json.loads(p.read_text())
    return rb if ck is not None and rb["checkpoint"] == ck.name else None


def apply_rollback(rb: dict[str, Any], guard: Guard, opt, sched):
    """Restore the counters from before the divergence and lower the LR; returns the data position to
    go on from (past the batches that diverged)."""
    from tasks.tokenize.loader import DataPosition

    guard.rollbacks, guard.skipped = rb["rollbacks"], rb["skipped_steps"]
    guard.lr_factor_vs_ck = rb["lr_factor"]
    sched.base_lrs = [lr * rb["lr_factor"] for lr in sched.base_lrs]  # saved with the schedule
    for g, lr in zip(opt.param_groups, sched.get_last_lr()):
        g["lr"] = lr * rb["lr_factor"]
    return DataPosition(**rb["data_position"])


def on_divergence(run_dir: Path, guard: Guard, step: int, pos, reason: str, latest: Path | None, main: bool) -> int:
    """Decide between a rollback to ``latest`` (the newest verified checkpoint) and a stop, write the
    file that tells the supervisor which, and return the worker's exit status. Every rank calls it and
    gets the same answer; rank 0 writes."""
    tc = guard.tc
    if tc.on_divergence == "rollback" and latest is not None and guard.rollbacks < tc.max_rollbacks:
        if main:
            write_json_atomic(run_dir / ROLLBACK_FILE, {
                "checkpoint": latest.name, "reason": reason, "at_step": step, "rollbacks": guard.rollbacks + 1,
                "skipped_steps": guard.skipped,
                "data_position": {"epoch": pos.epoch, "batch": pos.batch},
                "lr_factor": guard.lr_factor_vs_ck * tc.rollback_lr_factor})
            print(f"diverged at step {step} ({reason}): rolling back to {latest.name}", flush=True)
        return EXIT_ROLLBACK
    why = ("train.on_divergence=stop" if tc.on_divergence == "stop" else
           "no checkpoint to roll back to" if latest is None else f"train.max_rollbacks={tc.max_rollbacks} used up")
    msg = f"diverged at step {step}: {reason}; stopping ({why})"
    if main:
        write_json_atomic(run_dir / DIVERGED_FILE, {"step": step, "reason": reason, "message": msg})
        print(msg, flush=True)
    return EXIT_DIVERGED
