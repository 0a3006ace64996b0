"""Early stopping on held-out loss, and the size of the held-out sample it decides on.

The rule (train.early_stopping): training stops when ``patience`` evaluations in a row have not
lowered the held-out loss by at least ``min_delta`` below the reference (the loss at the last such
improvement). Separately, every evaluation that measures a new lowest loss asks for a checkpoint, so
the adapter the run keeps -- the best one -- is on disk whatever happens after.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class EarlyStop:
    patience: int
    min_delta: float
    enabled: bool = True
    reference: float = math.inf  # loss at the last improvement of at least min_delta
    best: float = math.inf  # the lowest loss measured
    best_step: int | None = None
    evals_without_improvement: int = 0

    @classmethod
    def from_config(cls, es, saved: dict[str, Any] | None = None) -> EarlyStop:
        """From train.early_stopping; ``saved`` = the state a checkpoint recorded (resume)."""
        out = cls(patience=es.patience, min_delta=es.min_delta, enabled=es.enabled)
        for k in ("reference", "best", "best_step", "evals_without_improvement"):
            if saved and k in saved:
                setattr(out, k, math.inf if saved[k] is None else saved[k])
        return out

    def state(self) -> dict[str, Any]:
        """JSON-safe (inf is not JSON): for trainer_state.json."""
        d = asdict(self)
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}

    def best_value(self) -> float | None:
        return None if math.isinf(self.best) else self.best

    def update(self, step: int, loss: float) -> tuple[bool, str | None]:
        """Record an evaluation: (is it the best so far -- save it, why training stops now or None).
        Ties count as best, so the newest of equal losses is kept, as prune_checkpoints keeps it."""
        new_best = math.isfinite(loss) and loss <= self.best
        if new_best:
            self.best, self.best_step = loss, step
        if math.isfinite(loss) and loss < self.reference - self.min_delta:
            self.reference, self.evals_without_improvement = loss, 0
        else:
            self.evals_without_improvement += 1
        if self.enabled and self.evals_without_improvement >= self.patience:
            return new_best, (f"early stopping: held-out loss has not improved by min_delta={self.min_delta} for "
                              f"{self.evals_without_improvement} evaluations (patience {self.patience}); best "
                              f"{self.best:.4f} at step {self.best_step}")
        return new_best, None
