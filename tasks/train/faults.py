"""Fault injection for tests (environment variables read by the worker; never set in production):

  D2A_INJECT_NAN_STEPS="3,5"   add NaN to the loss of the micro-batches that an uninterrupted run
                               trains on at these steps (keyed by data position, so a resumed or
                               rolled-back run meets them at the same data, never twice)
  D2A_INJECT_SPIKE_STEPS="6"   multiply those batches' loss by 1000 (a loss spike)
  D2A_INJECT_RANK="1"          inject on this rank only (default: every rank)
  D2A_STEP_SLEEP_S="0.2"       sleep after every step (gives signal tests a window)
  D2A_CKPT_PAUSE_STEP="4"      while writing checkpoint step-4, pause D2A_CKPT_PAUSE_S seconds
                               (default 30) after the adapter is in the .partial directory
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class DebugHooks:
    """Test/debug hooks from the environment (see the module docstring)."""

    nan_steps: set[int] = field(default_factory=set)
    spike_steps: set[int] = field(default_factory=set)
    rank: int | None = None
    step_sleep_s: float = 0.0
    ckpt_pause_step: int | None = None
    ckpt_pause_s: float = 30.0

    @classmethod
    def from_env(cls) -> DebugHooks:
        def ints(name: str) -> set[int]:
            return {int(x) for x in os.environ.get(name, "").replace(" ", "").split(",") if x}

        e = os.environ
        return cls(ints("D2A_INJECT_NAN_STEPS"), ints("D2A_INJECT_SPIKE_STEPS"),
                   int(e["D2A_INJECT_RANK"]) if e.get("D2A_INJECT_RANK") else None,
                   float(e.get("D2A_STEP_SLEEP_S") or 0),
                   int(e["D2A_CKPT_PAUSE_STEP"]) if e.get("D2A_CKPT_PAUSE_STEP") else None,
                   float(e.get("D2A_CKPT_PAUSE_S") or 30))

    def poison(self, loss, data_step: int, rank: int):
        """The loss, made NaN or spiking when this batch belongs to an injected step."""
        if self.rank is not None and self.rank != rank:
            return loss
        if data_step in self.nan_steps:
            return loss + float("nan")
        if data_step in self.spike_steps:
            return loss * 1000.0
        return loss
