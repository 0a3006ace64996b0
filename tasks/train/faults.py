"""Fault injection for tests (environment variables read by the worker; never set in production):

  D2A_INJECT_NAN_STEPS="3,5"   add NaN to the loss of the micro-batches that an uninterrupted run
                               trains on at these steps (keyed by data position, so a resumed or
                               rolled-back run meets them at the same data, never twice)
  D2A_INJECT_SPIKE_STEPS="6"   multiply those batches' loss by 1000 (a loss spike)
  D2A_INJECT_RANK="1"          inject on this rank only (default: every rank)
  D2A_STEP_SLEEP_S="0.2"       sleep after every step (gives signal tests a window)
  D2A_CKPT_PAUSE_STEP="4"      while writing checkpoint step-4, pause D2A_CKPT_PAUSE_S seconds
                               (default 30) after the adapter is in the .partial directory
  D2A_DUMP_GRADS_DIR="/path"   before every optimizer step, write the gradients the optimizer is
                               about to apply (after the DDP/FSDP reduction and clipping) to
                               /path/grads-rank<R>-step<N>.safetensors, keyed by the parameter's
                               index in the optimizer (the same order in every launch of one model)
  D2A_INJECT_GRAD_SUM="1"      before every optimizer step, all-reduce the gradients once more with
                               SUM: gradients summed over ranks instead of averaged, the bug that
                               the distributed equivalence tests must catch

The gradient hooks are torch's global optimizer step pre-hooks, installed by ``from_env`` (the
worker calls it before it builds its optimizer), so they see exactly what ``opt.step()`` applies.
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

    def __post_init__(self) -> None:
        dump, inject = os.environ.get("D2A_DUMP_GRADS_DIR"), os.environ.get("D2A_INJECT_GRAD_SUM") == "1"
        if dump or inject:
            install_grad_hooks(dump, inject)

    def poison(self, loss, data_step: int, rank: int):
        """The loss, made NaN or spiking when this batch belongs to an injected step."""
        if self.rank is not None and self.rank != rank:
            return loss
        if data_step in self.nan_steps:
            return loss + float("nan")
        if data_step in self.spike_steps:
            return loss * 1000.0
        return loss


_GRAD_HOOKS: list = []  # (handle,) once installed: one set per process


def install_grad_hooks(dump_dir: str | None, inject_sum: bool) -> None:
    """Global optimizer pre-step hooks (see the module docstring); installed once per process."""
    if _GRAD_HOOKS:
        return
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    steps = {"n": 0}

    def hook(opt, _args, _kwargs) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"]]
        if inject_sum and dist.is_available() and dist.is_initialized():
            for g in grads:
                if g is not None:
                    dist.all_reduce(g, op=dist.ReduceOp.SUM)
        steps["n"] += 1
        if dump_dir:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            out = Path(dump_dir)
            out.mkdir(parents=True, exist_ok=True)
            save_file({f"{i:05d}": (g if g is not None else torch.zeros(0)).detach().float().cpu().contiguous()
                       for i, g in enumerate(grads)}, str(out / f"grads-rank{rank}-step{steps['n']}.safetensors"))

    _GRAD_HOOKS.append(register_optimizer_step_pre_hook(hook))
