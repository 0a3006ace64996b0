"""QLoRA training: one readable loop, launched as a supervised subprocess.

``run_train`` is the stage: it prepares ``runs/<run_id>/`` (resolved config, inputs), launches the
worker (plain python for one process; ``accelerate launch`` or ``torchrun`` for several, on one or
many nodes), streams its output into the log, and returns the run's manifest. The run directory is
the whole contract between the two, so a killed or preempted worker is resumed by launching it again.

``train_worker`` is the loop: NF4 base + LoRA (PEFT), PagedAdamW8bit, warmup + cosine, gradient
accumulation, gradient checkpointing, periodic eval on a bounded held-out sample, atomic
checkpoints with the data position (O(1) resume), a divergence guard (non-finite or spiking steps
are skipped on every rank; too many roll back to the last good checkpoint or stop), metrics to
metrics.jsonl / TensorBoard / wandb.

Worker exit statuses (what the supervisor does with them):
  0   done; the adapter and manifest.json are written
  75  EXIT_PREEMPTED: SIGTERM/SIGINT (or the supervisor vanished); saved at a step boundary. Launch
      again to resume (the Prefect task retries it)
  76  EXIT_ROLLBACK: diverged; ``rollback.json`` names the checkpoint to reload. run_train relaunches
      at once: the resume path reloads it, with the data position moved past the bad batches
  77  EXIT_DIVERGED: diverged and told to stop (or out of rollbacks); ``diverged.json`` says why

Test/debug hooks (environment variables read by the worker; never set them in production):
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

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks._prefect import task  # workers on GPU nodes import this module without Prefect

from tasks.config import PipelineConfig, config_from_dict, dump_resolved, load_config, resolve_path
from tasks.manifest import Stage, fingerprint, library_versions, require_manifest, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved at a step boundary after SIGTERM/SIGINT; launch again to resume
EXIT_ROLLBACK = 76   # diverged: relaunch, the resume path reloads the checkpoint named in rollback.json
EXIT_DIVERGED = 77   # diverged and stopped: diverged.json says why
SUPERVISOR_ENV = "D2A_SUPERVISOR_PID"  # the worker stops (saving) when this process is gone
PREEMPTED_MARK, ROLLBACK_FILE, DIVERGED_FILE = "preempted.json", "rollback.json", "diverged.json"
_CKPT_RE = re.compile(r"^step-(\d+)$")


class TrainingInterrupted(RuntimeError):
    """The worker was preempted or killed; its checkpoints are intact, launching again resumes."""


class TrainingDiverged(RuntimeError):
    """The divergence guard stopped the run (see diverged.json in the run directory)."""


class TrainingFailed(RuntimeError):
    """A worker crashed (an exception, a collective timeout on a flaky node): retried, it resumes."""


def plan_steps(tc, rows: int, seq_len: int, world: int) -> dict[str, int]:
    """The step plan of a run: the schedule's clock is the optimizer step, and every step trains on
    exactly tokens_per_step tokens, so token budgets convert to steps once, here, and warmup,
    cosine decay, eval/save cadence and the ETA all follow tokens seen. ``rows`` = packed training rows."""
    mb, accum = tc.micro_batch_size, tc.grad_accum
    batches_per_epoch = rows // world // mb  # micro-batches per rank per epoch (PackedShards.batches)
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{rows} packed rows cannot fill one step of {world}x{mb}x{accum} rows")
    tokens_per_step = mb * accum * world * seq_len

    def to_steps(tokens: int | None, steps: int) -> int:
        return steps if tokens is None else math.ceil(tokens / tokens_per_step)

    if tc.max_steps:
        total = tc.max_steps
    elif tc.max_tokens:
        total = math.ceil(tc.max_tokens / tokens_per_step)
    else:
        total = math.ceil(tc.epochs * steps_per_epoch)
    return {"total_steps": total, "warmup_steps": to_steps(tc.warmup_tokens, tc.warmup_steps),
            "eval_every": max(1, to_steps(tc.eval_every_tokens, tc.eval_every)),
            "save_every": max(1, to_steps(tc.save_every_tokens, tc.save_every)),
            "tokens_per_step": tokens_per_step, "steps_per_epoch": steps_per_epoch,
            "batches_per_epoch": batches_per_epoch}


# ------------------------------------------------------------------------------- the stage
def train_stage(cfg: PipelineConfig) -> tuple[Stage, Path]:
    """The run's identity (model, LoRA, training settings, data) and the shards it trains on."""
    from tasks.model import load_tokenizer, resolve_base, tokenizer_fingerprint
    from tasks.tokenize import tokenized_dir

    tok = load_tokenizer(resolve_base(cfg.model, cfg.root / "models"), cfg.model)
    tok_dir = tokenized_dir(cfg, tokenizer_fingerprint(tok))
    tok_m = require_manifest(tok_dir, "tokenize")
    sections = {k: cfg.section(k) for k in ("model", "lora", "train")}
    # threads, launcher and this node's place in the layout change speed, not results: keep them
    # out of the run's identity (every node of a multi-node run must compute the same run dir)
    for k in ("num_threads", "node_rank", "rdzv_endpoint", "launcher"):
        sections["train"].pop(k)
    stage = Stage("train", Path(), {**sections, "seed": cfg.seed}, {"tokenized": tok_m["fingerprint"]})
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


def prepare_run(cfg: PipelineConfig) -> tuple[Path, list[str] | None, dict[str, Any] | None]:
    """Write the run directory's inputs; return (run_dir, launch command, None), or
    (run_dir, None, manifest) when the run is already complete."""
    from tasks.model import quantization_record, resolve_base

    stage, tok_dir = train_stage(cfg)
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
    (run_dir / f"inputs.json.{uniq}.tmp").write_text(json.dumps({
        "base": base, "tokenized_dir": str(tok_dir), "stage_fingerprint": stage.fingerprint,
        "stage_config": stage.config, "stage_inputs": stage.inputs,
        "quantization": quantization_record(cfg.model, base),
    }, indent=2, default=str))
    os.replace(run_dir / f"inputs.json.{uniq}.tmp", run_dir / "inputs.json")
    (run_dir / PREEMPTED_MARK).unlink(missing_ok=True)
    return run_dir, launch_command(cfg, run_dir), None


def run_train(cfg: PipelineConfig, logger: logging.Logger | None = None) -> dict[str, Any]:
    logger = logger or log
    run_dir, cmd, done = prepare_run(cfg)
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


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.info["pid"]) == pgid:
                out.append(p.info["pid"])
    return out


def supervise(cmd: list[str], logger: logging.Logger, grace_s: float = 60.0, env: dict[str, str] | None = None) -> int:
    """Run the worker in its own process group, stream its output line by line into the log, and
    make sure no rank outlives us. Cancellation, Ctrl-C or an exception here SIGTERMs the whole
    group (ranks save at the next step boundary), then SIGKILLs whatever is left after grace_s.
    If this process itself is killed outright, the workers notice (SUPERVISOR_ENV) and stop."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", SUPERVISOR_ENV: str(os.getpid()), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                logger.info("%s", line)
        return proc.wait()
    finally:
        _stop_group(proc, grace_s)


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    proc.poll()
    if not _group_members(pgid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, so it does not count as alive
        if not _group_members(pgid):
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    # SIGKILL is delivered asynchronously: return only once no member of the group is still running
    deadline = time.monotonic() + 10
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _retry_when_interrupted(task_, task_run, state) -> bool:
    """Prefect retries a preempted, killed or crashed worker (the relaunch resumes from the newest
    checkpoint); a divergence stop or a config/layout error raised before launch fails at once."""
    exc = getattr(state, "data", None)
    kinds = (TrainingInterrupted, TrainingFailed)
    return isinstance(exc, kinds) or any(k.__name__ in (state.message or "") for k in kinds)


@task(name="train", retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_when_interrupted)
def train(cfg_dict: dict) -> dict:
    from prefect.logging import get_run_logger

    return run_train(config_from_dict(cfg_dict), get_run_logger())


# ------------------------------------------------------------------------------ checkpoints
def _tensor_files(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file() and p.name != "checkpoint.json"}


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    """step-N directories that were renamed into place (a .partial one is a write that never finished)."""
    found = [p for p in (run_dir / "checkpoints").glob("step-*") if _CKPT_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_CKPT_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint whose files all verify; a torn or corrupted one is skipped with a message."""
    for ck in reversed(_complete_checkpoints(run_dir)):
        meta = ck / "checkpoint.json"
        if not meta.is_file():
            log.warning("checkpoint %s has no checkpoint.json (torn write?): skipped", ck)
            continue
        try:
            want = json.loads(meta.read_text())["files"]
        except (json.JSONDecodeError, KeyError):
            log.warning("checkpoint %s has an unreadable checkpoint.json: skipped", ck)
            continue
        if _tensor_files(ck) != want:
            log.warning("checkpoint %s fails its sha256 check: skipped", ck)
            continue
        return ck
    return None


def prune_checkpoints(run_dir: Path, keep: int, keep_best: bool, protect: Path) -> list[Path]:
    """Keep the newest ``keep`` complete checkpoints, the best by eval loss, and ``protect`` (the one
    just written and verified); delete the other complete ones. Returns what was deleted."""
    done = [p for p in _complete_checkpoints(run_dir) if (p / "checkpoint.json").is_file()]
    metas = {}
    for p in done:
        with contextlib.suppress(json.JSONDecodeError, OSError):
            metas[p] = json.loads((p / "checkpoint.json").read_text())
    keep_set = set(done[-keep:]) | {protect}
    scored = [(m["eval_loss"], int(m["step"]), p) for p, m in metas.items()
              if isinstance(m.get("eval_loss"), (int, float)) and math.isfinite(m["eval_loss"])]
    if keep_best and scored:
        keep_set.add(min(scored, key=lambda t: (t[0], -t[1]))[2])
    gone = [p for p in done if p not in keep_set]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


class NonFiniteWeights(RuntimeError):
    pass


def weights_finite(params, acc) -> bool:
    """True when every trainable weight on every rank is finite (each rank checks its own shard)."""
    import torch

    bad = torch.tensor(0.0 if all(bool(torch.isfinite(p.detach()).all()) for p in params) else 1.0, device=acc.device)
    return acc.reduce(bad, reduction="sum").item() == 0


def save_adapter(acc, model, out_dir: Path, fsdp: bool) -> None:
    """Write the adapter in plain PEFT format (adapter_config.json + adapter_model.safetensors).

    Under FSDP every rank takes part in gathering the full state dict to rank 0, which writes the
    LoRA tensors itself: PEFT's own save finds its layers by module name, and FSDP's wrapper
    prefixes hide them from it (it would write an empty adapter)."""
    from safetensors.torch import save_file

    if not fsdp:
        if acc.is_main_process:
            acc.unwrap_model(model).save_pretrained(out_dir, safe_serialization=True)
        return
    sd = acc.get_state_dict(model)
    if not acc.is_main_process:
        return
    peft_model = acc.unwrap_model(model)
    name = peft_model.active_adapter
    bias = peft_model.peft_config[name].bias
    keep = {}
    for k, v in sd.items():
        k = k.replace("_fsdp_wrapped_module.", "")
        if ("lora_" in k and f".{name}." in k) or (bias == "all" and k.endswith(".bias")):
            keep[k.replace(f".{name}", "")] = v.detach().cpu().contiguous()
    if not any("lora_" in k for k in keep):
        raise RuntimeError(f"no LoRA weights in the gathered FSDP state dict (keys like {list(sd)[:4]})")
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config[name].save_pretrained(str(out_dir))
    save_file(keep, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


def apply_liger(base: str) -> None:
    """liger-kernel's fused RoPE, RMSNorm, SwiGLU and linear+cross-entropy (the 131k-vocabulary
    logits never materialize). Patches the model classes, so it must run before loading."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError("train.liger_kernel=true needs a CUDA GPU (liger-kernel's kernels are Triton)")
    from liger_kernel.transformers import _apply_liger_kernel
    from transformers import AutoConfig

    _apply_liger_kernel(AutoConfig.from_pretrained(base).model_type, rope=True, rms_norm=True, swiglu=True,
                        cross_entropy=False, fused_linear_cross_entropy=True)


def portable_adapter_config(adapter_dir: Path, base_model: str) -> dict[str, str]:
    """Make the saved adapter_config.json loadable elsewhere: PEFT records the local path the base
    was loaded from, others need its name; and bias "all" on a model without bias terms trained
    nothing, so say "none" (vLLM refuses any other value). Returns the configured and saved bias."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_config.json"
    conf = json.loads(path.read_text())
    configured = conf.get("bias", "none")
    conf["base_model_name_or_path"] = base_model
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        only_lora = all("lora_" in k for k in f.keys())
    if configured != "none" and only_lora:
        conf["bias"] = "none"
    write_json_atomic(path, conf)
    return {"configured_bias": configured, "saved_bias": conf["bias"]}


def save_checkpoint(run_dir: Path, acc, model, opt, sched, state: dict[str, Any], tc, params,
                    fsdp: bool = False, pause_s: float = 0.0) -> Path:
    """Write checkpoints/step-N atomically: build it in step-N.partial, fsync, hash every file into
    checkpoint.json, then rename. A reader never sees a half-written step-N (a crash leaves only
    the .partial, which is ignored and cleaned up), and weights that are not finite are never written."""
    import torch

    if not weights_finite(params, acc):
        raise NonFiniteWeights(f"non-finite weights at step {state['step']}: checkpoint not written")
    ck_root = run_dir / "checkpoints"
    final = ck_root / f"step-{state['step']}"
    tmp = ck_root / f"step-{state['step']}.partial"
    rank = acc.process_index
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-rank{rank}.pt")
    # FSDP: every rank takes part in gathering the adapter, and keeps its own optimizer shard
    save_adapter(acc, model, tmp / "adapter", fsdp)
    if fsdp:
        torch.save(opt.state_dict(), tmp / f"optimizer-rank{rank}.pt")
    if acc.is_main_process:
        if pause_s:  # test hook: a kill lands while the checkpoint is half written
            print(f"checkpoint step-{state['step']}: pausing {pause_s}s mid-write (D2A_CKPT_PAUSE_STEP)", flush=True)
            time.sleep(pause_s)
        if not fsdp:
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
        write_json_atomic(tmp / "trainer_state.json", {**state, "scheduler": sched.state_dict(), "versions": library_versions()})
    acc.wait_for_everyone()
    if acc.is_main_process:
        for f in tmp.rglob("*"):  # the rename must not overtake the data on a crash
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        write_json_atomic(tmp / "checkpoint.json", {"step": state["step"], "eval_loss": state.get("eval_loss"),
                                                    "files": _tensor_files(tmp)})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(run_dir, tc.keep_checkpoints, tc.keep_best, protect=final)
    acc.wait_for_everyone()
    return final


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


class _SafeStream:
    """stdout/stderr that survive losing the reader: the supervisor's pipe breaks when it is killed,
    and a print must not crash the rank before it has saved; output goes on to a file instead."""

    def __init__(self, stream, fallback: Path):
        self.stream, self.fallback = stream, fallback

    def _swap(self) -> None:
        self.stream = open(self.fallback, "a", encoding="utf-8", buffering=1)

    def write(self, s: str) -> int:
        try:
            return self.stream.write(s)
        except (BrokenPipeError, ValueError, OSError):
            self._swap()
            return self.stream.write(s)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            self._swap()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _watch_supervisor(stop: dict[str, bool]) -> None:
    """If the process that launched us dies without stopping us (the flow run's process was killed
    outright), stop at the next step boundary like a preemption: no rank is left running unsupervised."""
    pid = os.environ.get(SUPERVISOR_ENV)
    if not pid:
        return
    import psutil

    try:
        sup = psutil.Process(int(pid))
    except psutil.Error:
        stop["flag"] = stop["orphaned"] = True
        return

    def watch() -> None:
        while not stop["flag"]:
            try:
                gone = not sup.is_running() or sup.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                gone = True
            if gone:
                print(f"supervisor (pid {pid}) is gone: stopping at the next step boundary", flush=True)
                stop["flag"] = stop["orphaned"] = True
                return
            time.sleep(0.5)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


# ---------------------------------------------------------------------------------- the loop
def train_worker(run_dir: Path) -> int:
    # read by the CUDA caching allocator at its first allocation: growable segments keep reserved
    # memory within ~1 GiB of allocated at the speed point (tasks/BENCH_NOTES.md) instead of fragmenting
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from tasks.model import quiet_libraries

    quiet_libraries()  # before bitsandbytes is imported: it logs a notice about optional hub kernels
    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object, set_seed
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import get_scheduler

    from tasks import fastpath
    from tasks.evaluate import eval_losses, load_eval_sets
    from tasks.model import load_base, load_tokenizer, tokenizer_fingerprint
    from tasks.tokenize import DataPosition, PackedShards, check_tokenizer, collate

    t_enter = time.time()  # startup phases go to metrics.jsonl ("startup"): launch-to-first-step is overhead on every resume
    rank_env = os.environ.get("RANK", "0")
    sys.stdout = _SafeStream(sys.stdout, run_dir / f"worker-rank{rank_env}.log")
    sys.stderr = _SafeStream(sys.stderr, run_dir / f"worker-rank{rank_env}.log")
    cfg = load_config(run_dir / "config.yaml")
    inputs = json.loads((run_dir / "inputs.json").read_text())
    tc = cfg.train
    hooks = DebugHooks.from_env()
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if tc.deterministic:  # bitwise-reproducible kernels (CUDA needs a fixed cuBLAS workspace)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    # without a GPU, accelerate only forms a process group (gloo) when told it is a CPU run
    acc = Accelerator(cpu=not torch.cuda.is_available())
    main, rank, world = acc.is_main_process, acc.process_index, acc.num_processes
    fsdp = acc.distributed_type == DistributedType.FSDP
    if fsdp:
        check_launch(cfg)  # quant_storage must equal the compute dtype
    set_seed(cfg.seed)  # the same LoRA init on every rank

    # data: refuse shards made by another tokenizer
    tok = load_tokenizer(inputs["base"], cfg.model)
    tok_fp = tokenizer_fingerprint(tok)
    tok_dir = Path(inputs["tokenized_dir"])
    check_tokenizer(json.loads((tok_dir / "manifest.json").read_text()), tok_fp, tok_dir)
    train_set = PackedShards(tok_dir / "train")
    eval_sets = load_eval_sets(tok_dir)
    mb, accum = tc.micro_batch_size, tc.grad_accum
    # token budgets (max_tokens, warmup/eval/save in tokens) become steps once: see plan_steps
    plan = plan_steps(tc, len(train_set), train_set.seq_len, world)
    total_steps, warmup, eval_every, save_every = (plan[k] for k in ("total_steps", "warmup_steps", "eval_every", "save_every"))
    tokens_per_step, steps_per_epoch, batches_per_epoch = (plan[k] for k in ("tokens_per_step", "steps_per_epoch", "batches_per_epoch"))

    # model: NF4 base, LoRA on the attention projections. Under FSDP no device_map: the model is
    # loaded where accelerate/transformers put it and FSDP shards it.
    device_map = {"": acc.local_process_index} if torch.cuda.is_available() and not fsdp else None
    t_model = time.time()
    # the fast path (tasks/fastpath.py): varlen attention, liger kernels, the fused LoRA function,
    # selective recomputation / activation offload, as the train section switches them on this machine
    fp = fastpath.resolve(tc, fsdp=fsdp)
    if main:
        print(f"fast path: {fp.describe()}", flush=True)
    if fp.liger:
        apply_liger(inputs["base"])
    model = load_base(inputs["base"], cfg.model, device_map=device_map, attn_implementation=fp.attn_implementation)
    fastpath.prepare_base(model, fp)
    lc = cfg.lora
    model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                             target_modules=lc.target_modules, bias=lc.bias, task_type="CAUSAL_LM"))
    fastpath.prepare_peft(model, fp)

    t_model = time.time() - t_model
    t_resume = time.time()
    # resume: the newest verified checkpoint. The adapter goes in before wrapping (the same code for
    # one process, DDP and FSDP); optimizer, schedule, RNG and data position after.
    if main:  # a write that a crash interrupted: never complete, never read
        for p in (run_dir / "checkpoints").glob("step-*.partial"):
            shutil.rmtree(p, ignore_errors=True)
    ck = latest_checkpoint(run_dir)
    st: dict[str, Any] = {}
    if ck is not None:
        st = json.loads((ck / "trainer_state.json").read_text())
        if st.get("world_size", world) != world:
            raise ValueError(f"{ck} was written by {st['world_size']} processes, this launch has {world}: the data "
                             f"position is per rank, so resume with train.num_processes x train.nnodes = {st['world_size']}")
        if st.get("tokenizer_fingerprint", tok_fp) != tok_fp:
            raise ValueError(f"{ck} was trained with tokenizer {st['tokenizer_fingerprint'][:16]}, this is {tok_fp[:16]}")
        set_peft_model_state_dict(model, load_file(ck / "adapter" / "adapter_model.safetensors"))
    elif tc.init_adapter:  # continue from an earlier adapter (e.g. the promoted one) instead of LoRA's zero init
        init = resolve_path(tc.init_adapter) / "adapter_model.safetensors"
        if not init.is_file():
            raise FileNotFoundError(f"train.init_adapter: {init} not found")
        result = set_peft_model_state_dict(model, load_file(init))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"train.init_adapter: {init} does not fit this model/LoRA config "
                             f"(unexpected keys like {result.unexpected_keys[:3]})")
    # a rollback relaunch: the same checkpoint, but the data moves on past the batches that diverged
    rollback = json.loads((run_dir / ROLLBACK_FILE).read_text()) if (run_dir / ROLLBACK_FILE).is_file() else None
    if rollback and (ck is None or rollback["checkpoint"] != ck.name):
        rollback = None  # a newer checkpoint exists: that rollback is history
    set_seed(cfg.seed + rank)  # dropout differs per rank, as in any DDP run

    if fsdp:  # as transformers' Trainer does for QLoRA: LoRA layers in their own FSDP units, 4-bit storage dtype
        from peft.utils.other import fsdp_auto_wrap_policy

        plugin = acc.state.fsdp_plugin
        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        if cfg.model.quantization.load_in_4bit:
            store = getattr(torch, cfg.model.quantization.quant_storage)
            plugin.set_mixed_precision(store, override=True)
            # FSDP flattens each unit into one tensor of one dtype, and a float32 LoRA layer would get
            # bf16 activations: keep every floating parameter (LoRA included) in the storage dtype
            for p in model.parameters():
                if p.dtype.is_floating_point and p.dtype != store:
                    p.data = p.data.to(store)
    # wrap first, then build the optimizer on what the wrapper trains (FSDP replaces the parameters
    # with flat shards; an optimizer over the originals would step tensors no longer in use)
    model = acc.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=tc.lr, weight_decay=tc.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    opt = acc.prepare(opt)
    sched = get_scheduler(tc.scheduler, opt, num_warmup_steps=warmup, num_training_steps=total_steps)

    step, tokens_seen, skipped, rollbacks, pos = 0, 0, 0, 0, DataPosition()
    if ck is not None:
        opt_file = ck / (f"optimizer-rank{rank}.pt" if fsdp else "optimizer.pt")
        opt.load_state_dict(torch.load(opt_file, weights_only=True))
        sched.load_state_dict(st["scheduler"])
        step, tokens_seen, skipped = st["step"], st["tokens_seen"], st["skipped_steps"]
        rollbacks = st.get("rollbacks", 0)
        pos = DataPosition(**st["data_position"])
        rng_file = ck / f"rng-rank{rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            rng = rng if isinstance(rng, dict) else {"cpu": rng}
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        if rollback:
            pos, rollbacks, skipped = DataPosition(**rollback["data_position"]), rollback["rollbacks"], rollback["skipped_steps"]
            sched.base_lrs = [lr * rollback["lr_factor"] for lr in sched.base_lrs]  # saved with the schedule
            for g, lr in zip(opt.param_groups, sched.get_last_lr()):
                g["lr"] = lr * rollback["lr_factor"]
        if main:
            print(f"resumed from {ck.name}: step {step}, epoch {pos.epoch}, batch {pos.batch}"
                  + (f" (rollback {rollbacks}: data moved on to batch {pos.batch}, lr x{rollback['lr_factor']})"
                     if rollback else ""), flush=True)

    # preemption: SIGTERM/SIGINT (or losing the supervisor) finish the step, save, exit 75
    stop = {"flag": False, "orphaned": False}

    def _on_signal(signum, _frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    _watch_supervisor(stop)

    tracker = Tracker(run_dir, cfg, enabled=main)
    batches = train_set.batches(cfg.seed, mb, pos, rank, world)  # O(1): starts at pos, no replay
    now = time.time()
    startup = {"step": step, "event": "startup", "resumed_from": ck.name if ck else None,
               "process_s": round(now - _process_start(t_enter), 2), "model_load_s": round(t_model, 2),
               "resume_s": round(now - t_resume, 2)}  # resume_s: PEFT wrap + checkpoint + optimizer + data position
    tracker.log(startup)
    if main:
        print(f"startup: {startup['process_s']:.1f} s since the process started, of which model load "
              f"{startup['model_load_s']:.1f} s and wrap/resume {startup['resume_s']:.1f} s", flush=True)
    device = acc.device
    total_tokens = total_steps * tokens_per_step
    if main:
        print(f"training {total_steps} steps ({steps_per_epoch}/epoch, {total_tokens:,} tokens) of {tokens_per_step:,} "
              f"tokens on {world} process(es); {sum(p.numel() for p in params):,} trainable parameters", flush=True)
    t_start, tokens0, loss_val = time.time(), tokens_seen, float("nan")
    last_eval: tuple[int, float] | None = None
    bad_in_row, recent = 0, deque(maxlen=tc.spike_window)  # the divergence guard's memory
    # LR factor applied on top of the newest checkpoint's schedule (rollbacks to it compound)
    lr_factor_vs_ck = rollback["lr_factor"] if rollback else 1.0
    orders: dict[int, np.ndarray] = {}

    def sample_ids(positions: list[DataPosition]) -> list[int]:
        """Row indices of the micro-batches that ended at these positions (for the skip log)."""
        out = []
        for p in positions:
            if p.epoch not in orders:
                orders.clear()
                orders[p.epoch] = train_set.order(cfg.seed, p.epoch, rank, world)
            out += [int(i) for i in orders[p.epoch][(p.batch - 1) * mb: p.batch * mb]]
        return out

    def save(tag_step: int) -> None:
        ev = last_eval[1] if last_eval and last_eval[0] == tag_step else None
        save_checkpoint(run_dir, acc, model, opt, sched, {
            "step": tag_step, "tokens_seen": tokens_seen, "skipped_steps": skipped, "rollbacks": rollbacks,
            "data_position": {"epoch": pos.epoch, "batch": pos.batch}, "eval_loss": ev,
            "world_size": world, "tokens_per_step": tokens_per_step, "seq_len": train_set.seq_len,
            "train_fingerprint": inputs["stage_fingerprint"], "config_fingerprint": fingerprint(cfg.model_dump(mode="json")),
            "tokenizer_fingerprint": tok_fp, "tokenized": inputs["stage_inputs"]["tokenized"],
        }, tc, params, fsdp=fsdp, pause_s=hooks.ckpt_pause_s if hooks.ckpt_pause_step == tag_step else 0.0)
        nonlocal lr_factor_vs_ck
        lr_factor_vs_ck = 1.0
        if main:
            (run_dir / ROLLBACK_FILE).unlink(missing_ok=True)  # a newer checkpoint holds its effect now

    def diverged(reason: str) -> int:
        """Roll back (relaunch from the newest good checkpoint, data moving on) or stop, on every rank."""
        good = latest_checkpoint(run_dir)
        if tc.on_divergence == "rollback" and good is not None and rollbacks < tc.max_rollbacks:
            if main:
                write_json_atomic(run_dir / ROLLBACK_FILE, {
                    "checkpoint": good.name, "reason": reason, "at_step": step, "rollbacks": rollbacks + 1,
                    "skipped_steps": skipped,
                    "data_position": {"epoch": pos.epoch, "batch": pos.batch},
                    "lr_factor": lr_factor_vs_ck * tc.rollback_lr_factor})
                print(f"diverged at step {step} ({reason}): rolling back to {good.name}", flush=True)
            code = EXIT_ROLLBACK
        else:
            why = ("train.on_divergence=stop" if tc.on_divergence == "stop" else
                   "no checkpoint to roll back to" if good is None else f"train.max_rollbacks={tc.max_rollbacks} used up")
            msg = f"diverged at step {step}: {reason}; stopping ({why})"
            if main:
                write_json_atomic(run_dir / DIVERGED_FILE, {"step": step, "reason": reason, "message": msg})
                print(msg, flush=True)
            code = EXIT_DIVERGED
        tracker.log({"step": step, "event": "rollback" if code == EXIT_ROLLBACK else "diverged", "reason": reason})
        tracker.close()
        acc.wait_for_everyone()
        return code

    while step < total_steps:
        model.train()
        loss_sum = torch.zeros((), device=device)
        positions = []
        for micro in range(accum):
            pos, rows = next(batches)
            positions.append(pos)
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            # only the last micro-batch synchronises gradients across ranks
            sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(model)
            with sync:
                loss = model(**batch, use_cache=False).loss
                if hooks.nan_steps or hooks.spike_steps:  # test hook, keyed by the data an uninterrupted run sees
                    loss = hooks.poison(loss, (pos.epoch * batches_per_epoch + pos.batch - 1) // accum + 1, rank)
                acc.backward(loss / accum)
            loss_sum += loss.detach() / accum
        # FSDP clips through the wrapped model (its norm spans every shard), hence all parameters
        grad_norm = acc.clip_grad_norm_(model.parameters() if fsdp else params, tc.max_grad_norm)
        grad_norm = torch.as_tensor(grad_norm, device=device, dtype=torch.float32)
        # one all-reduce decides for every rank together: [any non-finite, any stop signal, loss sum]
        nonfinite = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)).float()
        flags = acc.reduce(torch.stack([nonfinite, torch.tensor(float(stop["flag"]), device=device),
                                        loss_sum.float()]), reduction="sum")
        bad, stopping, loss_val = flags[0].item() > 0, flags[1].item() > 0, flags[2].item() / world
        spike = (not bad and tc.spike_factor is not None and len(recent) == recent.maxlen
                 and loss_val > tc.spike_factor * sum(recent) / len(recent))
        if bad or spike:  # skip: no update, the same on every rank
            skipped += 1
            bad_in_row += 1
            reason = "non-finite loss/gradient" if bad else f"loss spike {loss_val:.3g} > {tc.spike_factor} x running mean"
            ids = gather_object([sample_ids(positions)])  # every rank's rows, rank order
            tracker.log({"step": step + 1, "event": "skipped_step", "reason": reason, "skipped_steps": skipped,
                         "sample_ids": ids, "data_positions": [[p.epoch, p.batch] for p in positions]})
            if main:
                print(f"step {step + 1}: {reason}, step skipped ({skipped} so far); sample ids {ids}", flush=True)
        else:
            opt.step()
            bad_in_row = 0
            recent.append(loss_val)
        sched.step()  # the schedule follows steps (= tokens), taken or skipped
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        if spike or bad_in_row >= tc.max_bad_steps:
            return diverged(reason if spike else f"{bad_in_row} non-finite steps in a row")
        elapsed = time.time() - t_start
        tps = (tokens_seen - tokens0) / max(elapsed, 1e-9)
        eta = (total_tokens - tokens_seen) / max(tps, 1e-9)
        rec = {"step": step, "loss": loss_val, "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
               "tokens_seen": tokens_seen, "tokens_per_s": tps, "eta_s": eta,
               "epoch": pos.epoch + pos.batch / max(batches_per_epoch, 1)}
        if torch.cuda.is_available():
            rec["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if step % tc.log_every == 0 or step == total_steps:
            tracker.log(rec)
            if main:
                print(f"step {step}/{total_steps} | loss {loss_val:.4f} | lr {rec['lr']:.2e} | grad {rec['grad_norm']:.3f} "
                      f"| {tokens_seen:,}/{total_tokens:,} tok | {tps:,.0f} tok/s | ETA {_fmt_eta(eta)}", flush=True)
        if eval_sets and (step % eval_every == 0 or step == total_steps):
            res = eval_losses(model if fsdp else acc.unwrap_model(model), eval_sets, max_rows=tc.eval_batches * mb,
                              batch_size=mb, device=device)
            ev = {"step": step, "eval_loss": res["overall"]["loss"],
                  **{f"eval_loss/{c}": r["loss"] for c, r in res["categories"].items()}}
            last_eval = (step, ev["eval_loss"])
            tracker.log(ev)
            if main:
                print(f"eval @ {step}: loss {ev['eval_loss']:.4f} | " +
                      " ".join(f"{c} {r['loss']:.3f}" for c, r in res["categories"].items()), flush=True)
        try:
            if step % save_every == 0 or step == total_steps or stopping:
                save(step)
        except NonFiniteWeights as e:  # never written; the last good checkpoint is the way back
            return diverged(str(e))
        if hooks.step_sleep_s:
            time.sleep(hooks.step_sleep_s)
        if stopping:
            if main:
                write_json_atomic(run_dir / PREEMPTED_MARK, {"step": step, "orphaned": stop["orphaned"]})
                print(f"preempted: saved step {step}; exiting with status {EXIT_PREEMPTED}", flush=True)
            tracker.close()
            acc.wait_for_everyone()
            return EXIT_PREEMPTED

    # the final adapter, in plain PEFT format (safetensors), with what inference must reproduce
    final, tmp = run_dir / "adapter", run_dir / "adapter.partial"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(acc, model, tmp, fsdp)
    if main:
        tok.save_pretrained(tmp)
        bias = portable_adapter_config(tmp, cfg.model.name)
        write_json_atomic(tmp / "quantization.json", inputs["quantization"])
        write_json_atomic(tmp / "lineage.json", {"run_dir": str(run_dir), "base_model": cfg.model.name,
                                                 "tokenized": inputs["stage_inputs"]["tokenized"],
                                                 "train_fingerprint": inputs["stage_fingerprint"], **bias})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_json_atomic(run_dir / "manifest.json", {
            "stage": "train", "fingerprint": inputs["stage_fingerprint"], "config": inputs["stage_config"],
            "inputs": inputs["stage_inputs"],
            "counts": {"steps": step, "tokens_seen": tokens_seen, "skipped_steps": skipped, "rollbacks": rollbacks,
                       "train_rows": len(train_set), "final_loss": loss_val, "world_size": world,
                       "wall_s": round(time.time() - t_start, 1)},
            "run_dir": str(run_dir), "adapter": str(final),
            "files": {f"adapter/{k}": v for k, v in _tensor_files(final).items()},
            "versions": library_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        print(f"adapter saved to {final}", flush=True)
    tracker.close()
    acc.wait_for_everyone()
    return 0


def _process_start(fallback: float) -> float:
    """When this process was created (the launcher's own start-up before it counts too)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing on a bare node: from the worker's entry
        return fallback


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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # the loop itself, as launched by run_train / accelerate launch
        w = argparse.ArgumentParser(prog="tasks.train worker")
        w.add_argument("--run-dir", required=True, type=Path)
        sys.exit(train_worker(w.parse_args(argv[1:]).run_dir))
    ap = argparse.ArgumentParser(description="QLoRA training stage: prepares the run and launches the loop.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--prepare-only", action="store_true",
                    help="write the run directory and print the launch command (for SLURM/hand-typed launches)")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if a.prepare_only:
        run_dir, cmd, done = prepare_run(load_config(a.config, a.overrides))
        print(f"run_dir: {run_dir}\n" + ("complete" if done else "launch: " + " ".join(cmd)))
        return
    m = run_train(load_config(a.config, a.overrides))
    print(f"train: adapter at {m['adapter']}")


if __name__ == "__main__":
    main()
