"""Metrics out of the loop: metrics.jsonl, TensorBoard, wandb, and the progress line (tokens/s, ETA)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tasks.core.config import (
    PipelineConfig,
)


def _fmt_eta(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Tracker:
    """The same metrics to metrics.jsonl, TensorBoard and (when asked for) wandb; rank 0 only."""

    def __init__(self, run_dir: Path, cfg: PipelineConfig, enabled: bool):
        self.enabled = enabled
        self.f = self.tb = self.wandb = None
        if not enabled:
            return
        self.f = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        want = cfg.tracking.wandb
        if want == "on" or (want == "auto" and (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"))):
            import wandb

            self.wandb = wandb.init(project=cfg.tracking.wandb_project, name=run_dir.name, dir=str(run_dir),
                                    config=json.loads(cfg.model_dump_json()), resume="allow", id=run_dir.name)

    def log(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps({**rec, "time": time.time()}) + "\n")
        self.f.flush()
        step = rec["step"]
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)):
                if self.tb:
                    self.tb.add_scalar(k, v, step)
        if self.tb:
            self.tb.flush()
        if self.wandb:
            self.wandb.log({k: v for k, v in rec.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
