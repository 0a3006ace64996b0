from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tasks.core._prefect import (  # workers on GPU nodes import this module without Prefect
    RetryPolicy,
    task,
)
from tasks.core.config import (
    PipelineConfig,
    config_from_dict,
    dump_resolved,
    resolve_path,
)
from tasks.core.manifest import (
    Stage,
    exclusive,
    require_manifest,
)
from tasks.train.supervisor import (
    DIVERGED_FILE,
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    EXIT_ROLLBACK,
    PREEMPTED_MARK,
    ROLLBACK_FILE,
    TrainingDiverged,
    TrainingInterrupted,
    supervise,
)

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """A worker crashed (an exception, a collective timeout on a flaky node): retried, it resumes."""


# ------------------------------------------------------------------------------- the stage
def train_stage(cfg: PipelineConfig) -> tuple[Stage, Path]:
    """The run's identity (model, LoRA, training settings, data) and the shards it trains on."""
    from tasks.core.model import load_tokenizer, resolve_base, tokenizer_fingerprint
    from tasks.tokenize.loader import tokenized_dir

    tok = load_tokenizer(resolve_base(cfg.model, cfg.root / "models"), cfg.model)
    tok_dir = tokenized_dir(cfg, tokenizer_fingerprint(tok))
    tok_m = require_manifest(tok_dir, "tokenize")
    sections = {k: cfg.section(k) for k in ("model", "lora", "train")}
    # threads, launcher and this node's place in the layout change speed, not results: keep them
    # out of the run's identity (every node of a multi-node run must compute the same run dir)
    for k in ("num_threads", "node_rank", "rdzv_endpoint", "launcher"):
        sections["train"].pop(k)
    stage = Stage("train", Path(), {**sections, "seed": cfg.seed}, {"tokenized": tok_m["fingerprint"]}, locks=False)
    stage.out_dir = cfg.root / "runs" / f"{cfg.run_name}-{stage.fingerprint[:10]}"
    return stage, tok_dir


def run_dir_for(cfg: PipelineConfig) -> Path:
    return train_stage(cfg)[0].out_dir


def accelerate_yaml(cfg: PipelineConfig) -> dict[str, Any]:
    import yaml

    if not cfg.train.accelerate_config:
        return {}
    p = resolve_path(cfg.train.accelerate_config)
    if not p.is_file():
        raise FileNotFoundError(f"train.accelerate_config: {p} not found")
    return yaml.safe_load(p.read_text(encoding="utf-8")) or {}


def check_launch(cfg: PipelineConfig) -> None:
    """Refuse layouts that cannot work, before any process starts, with the key to change."""
    tc, q = cfg.train, cfg.model.quantization
    if tc.nnodes > 1 and not tc.rdzv_endpoint:
        raise ValueError(f"train.nnodes={tc.nnodes} needs train.rdzv_endpoint=<host:port of node 0>")
    if tc.node_rank >= tc.nnodes:
        raise ValueError(f"train.node_rank={tc.node_rank} must be < train.nnodes={tc.nnodes}")
    if accelerate_yaml(cfg).get("distributed_type") == "FSDP":
        if tc.launcher == "torchrun":
            raise ValueError("an FSDP accelerate_config needs train.launcher=accelerate (or auto), not torchrun")
        if q.load_in_4bit and q.quant_storage != q.compute_dtype:
            raise ValueError(
                f"FSDP-QLoRA needs model.quantization.quant_storage equal to the compute dtype "
                f"({q.compute_dtype!r}), but it is {q.quant_storage!r}: FSDP flattens every parameter of a "
                f"wrapped module into one tensor of one dtype, so 4-bit weights stored as uint8 cannot be "
                f"sharded beside {q.compute_dtype} ones. Set model.quantization.quant_storage={q.compute_dtype}."
            )


def launch_command(cfg: PipelineConfig, run_dir: Path) -> list[str]:
    """plain python (one process) | accelerate launch (DDP/FSDP configs, one or many nodes) |
    torchrun (DDP, also on CPU with gloo). Multi-node uses torch's c10d rendezvous at rdzv_endpoint."""
    tc = cfg.train
    worker = ["-m", "tasks.train", "worker", "--run-dir", str(run_dir)]
    launcher = tc.launcher
    if launcher == "auto":
        single = tc.num_processes == 1 and tc.nnodes == 1 and not tc.accelerate_config
        launcher = "python" if single else "accelerate"
    if launcher == "python":
        return [sys.executable, *worker]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(tc.nnodes),
               "--nproc_per_node", str(tc.num_processes)]
        if tc.nnodes > 1:
            cmd += ["--node_rank", str(tc.node_rank), "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", str(tc.rdzv_endpoint), "--rdzv_id", run_dir.name]
        else:
            cmd += ["--standalone"]  # a free local port: concurrent runs on one host do not collide
        return [*cmd, *worker]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(tc.num_processes * tc.nnodes)]
    if tc.accelerate_config:
        cmd += ["--config_file", str(resolve_path(tc.accelerate_config))]
    if tc.nnodes > 1:
        host, port = str(tc.rdzv_endpoint).rsplit(":", 1)
        cmd += ["--num_machines", str(tc.nnodes), "--machine_rank", str(tc.node_rank),
                "--main_process_ip", host, "--main_process_port", port, "--rdzv_backend", "c10d"]
    return [*cmd, *worker]


def prepare_run(cfg: PipelineConfig, _stage: tuple[Stage, Path] | None = None
                ) -> tuple[Path, list[str] | None, dict[str, Any] | None]:
    """Write the run directory's inputs; return (run_dir, launch command, None), or
    (run_dir, None, manifest) when the run is already complete."""
    from tasks.core.model import quantization_record, resolve_base

    stage, tok_dir = _stage or train_stage(cfg)
    run_dir = stage.out_dir
    if done := stage.up_to_date():
        return run_dir, None, done
    check_launch(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    # every node of a multi-node run writes these into the shared run dir: atomically, each with
    # its own temporary name (the contents agree: node_rank is not read back by the worker)
    uniq = f"{os.getpid()}.{threading.get_ident()}"
    dump_resolved(cfg, run_dir / f"config.yaml.{uniq}.tmp")
    os.replace(run_dir / f"config.yaml.{uniq}.tmp", run_dir / "config.yaml")
    base = resolve_base(cfg.model, cfg.root / "models")
    record = quantization_record(cfg.model, base)
    _check_resume_base(run_dir, record["base_revision"])
    _check_init_adapter_base(cfg, record["base_revision"])
    (run_dir / f"inputs.json.{uniq}.tmp").write_text(json.dumps({
        "base": base, "tokenized_dir": str(tok_dir), "stage_fingerprint": stage.fingerprint,
        "stage_config": stage.config, "stage_inputs": stage.inputs,
        "quantization": record,
    }, indent=2, default=str))
    os.replace(run_dir / f"inputs.json.{uniq}.tmp", run_dir / "inputs.json")
    (run_dir / PREEMPTED_MARK).unlink(missing_ok=True)
    return run_dir, launch_command(cfg, run_dir), None


def _check_resume_base(run_dir: Path, revision: str) -> None:
    """A run with checkpoints resumes only on the base revision it started on (tasks/core/model.py)."""
    from tasks.core.model import check_base_revision
    from tasks.train.checkpoint import latest_checkpoint

    prev = run_dir / "inputs.json"
    if prev.is_file() and (ck := latest_checkpoint(run_dir)) is not None:
        recorded = json.loads(prev.read_text()).get("quantization", {}).get("base_revision")
        check_base_revision(recorded, revision, f"checkpoint {ck.name} of run {run_dir.name}")


def _check_init_adapter_base(cfg: PipelineConfig, revision: str) -> None:
    """A warm start (train.init_adapter) only from an adapter trained on this very base revision: LoRA
    deltas learned on other weights start the run from a wrong point. An adapter whose directory records
    no revision (made outside this tool, or before revisions were recorded) passes, as for checkpoints."""
    from tasks.core.config import resolve_path
    from tasks.core.model import check_base_revision

    if not cfg.train.init_adapter:
        return
    rec = resolve_path(cfg.train.init_adapter) / "quantization.json"
    recorded = json.loads(rec.read_text()).get("base_revision") if rec.is_file() else None
    check_base_revision(recorded, revision, f"train.init_adapter {cfg.train.init_adapter}")


def run_train(cfg: PipelineConfig, logger: logging.Logger | None = None) -> dict[str, Any]:
    """Train (or resume) in the run directory, holding its lock: a second run of the same run
    directory (on this node of it) fails at once naming the holder."""
    logger = logger or log
    stage = train_stage(cfg)
    lock = stage[0].lock_path
    if cfg.train.nnodes > 1:  # every node supervises its own workers in the shared run directory
        lock = lock.with_name(f"{stage[0].out_dir.name}.node{cfg.train.node_rank}.lock")
    with exclusive(lock, f"training run {stage[0].out_dir}"):
        return _run_train_locked(cfg, logger, stage)


def _run_train_locked(cfg: PipelineConfig, logger: logging.Logger, stage: tuple[Stage, Path]) -> dict[str, Any]:
    run_dir, cmd, done = prepare_run(cfg, stage)
    if done:
        logger.info("train: up to date (%s)", run_dir)
        return done
    while True:
        logger.info("train: launching %s", " ".join(cmd))
        t0 = time.time()
        rc = supervise(cmd, logger)
        outcome = _outcome(rc, run_dir, t0)
        if outcome != "rollback":
            break
        rb = json.loads((run_dir / ROLLBACK_FILE).read_text())
        logger.warning("train: rolled back to %s (%s); relaunching", rb["checkpoint"], rb["reason"])
    if outcome == "done":
        return require_manifest(run_dir, "train")
    if outcome == "diverged":
        raise TrainingDiverged(f"training stopped: {json.loads((run_dir / DIVERGED_FILE).read_text())['message']} "
                               f"(run {run_dir})")
    if outcome == "interrupted":
        raise TrainingInterrupted(f"training was preempted/killed (status {rc}); checkpoints in {run_dir} "
                                  f"are intact: run it again to resume")
    raise TrainingFailed(f"training worker exited with status {rc}; see the log above and {run_dir}")


def _outcome(rc: int, run_dir: Path, t0: float) -> str:
    """done | rollback | diverged | interrupted | failed. A launcher (torchrun, accelerate launch)
    turns a rank's status into its own (1), so the files rank 0 wrote during this launch decide."""
    def fresh(name: str) -> bool:
        p = run_dir / name
        return p.is_file() and p.stat().st_mtime >= t0

    if rc == 0:
        return "done"
    if rc == EXIT_ROLLBACK or fresh(ROLLBACK_FILE):
        return "rollback"
    if (rc == EXIT_DIVERGED or fresh(DIVERGED_FILE)) and (run_dir / DIVERGED_FILE).is_file():
        return "diverged"
    if rc == EXIT_PREEMPTED or fresh(PREEMPTED_MARK) or rc < 0:
        return "interrupted"  # < 0: killed by a signal (node lost, OOM killer): checkpoints are intact
    return "failed"


# Prefect relaunches a preempted, killed or crashed worker (it resumes from the newest checkpoint);
# a divergence stop or a config/layout error raised before launch fails at once
TRAIN_RETRY = RetryPolicy(retry_on=(TrainingInterrupted, TrainingFailed))
_retry_when_interrupted = TRAIN_RETRY.should_retry


@task(name="train", **TRAIN_RETRY.options())
def train(cfg_dict: dict) -> dict:
    from prefect.logging import get_run_logger

    return run_train(config_from_dict(cfg_dict), get_run_logger())
