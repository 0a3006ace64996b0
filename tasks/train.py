"""QLoRA training: one readable loop, launched as a supervised subprocess.

``run_train`` is the stage: it prepares ``runs/<run_id>/`` (resolved config, inputs), launches the
worker (``accelerate launch`` when several processes are asked for, plain python otherwise),
streams its output into the log, and returns the run's manifest. The run directory is the whole
contract between the two, so a killed or preempted worker is resumed by launching it again.

``train_worker`` is the loop: NF4 base + LoRA (PEFT), PagedAdamW8bit, warmup + cosine, gradient
accumulation, gradient checkpointing, periodic eval on a bounded held-out sample, atomic
checkpoints with the data position (O(1) resume), metrics to metrics.jsonl / TensorBoard / wandb.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import task

from tasks.config import PipelineConfig, config_from_dict, dump_resolved, load_config
from tasks.manifest import Stage, library_versions, require_manifest, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved at a step boundary after SIGTERM/SIGINT; launch again to resume


# ------------------------------------------------------------------------------- the stage
def train_stage(cfg: PipelineConfig) -> tuple[Stage, Path]:
    """The run's identity (model, LoRA, training settings, data) and the shards it trains on."""
    from tasks.model import load_tokenizer, resolve_base, tokenizer_fingerprint
    from tasks.tokenize import tokenized_dir

    tok = load_tokenizer(resolve_base(cfg.model, cfg.root / "models"), cfg.model)
    tok_dir = tokenized_dir(cfg, tokenizer_fingerprint(tok))
    tok_m = require_manifest(tok_dir, "tokenize")
    sections = {k: cfg.section(k) for k in ("model", "lora", "train")}
    # threads and launcher layout change speed, not results: keep them out of the run's identity
    for k in ("num_threads",):
        sections["train"].pop(k)
    stage = Stage("train", Path(), {**sections, "seed": cfg.seed}, {"tokenized": tok_m["fingerprint"]})
    stage.out_dir = cfg.root / "runs" / f"{cfg.run_name}-{stage.fingerprint[:10]}"
    return stage, tok_dir


def run_dir_for(cfg: PipelineConfig) -> Path:
    return train_stage(cfg)[0].out_dir


def launch_command(cfg: PipelineConfig, run_dir: Path) -> list[str]:
    tc = cfg.train
    worker = ["-m", "tasks.train", "worker", "--run-dir", str(run_dir)]
    if tc.num_processes == 1 and not tc.accelerate_config:
        return [sys.executable, *worker]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(tc.num_processes)]
    if tc.accelerate_config:
        from tasks.config import resolve_path

        cmd += ["--config_file", str(resolve_path(tc.accelerate_config))]
    return [*cmd, *worker]


def run_train(cfg: PipelineConfig, logger: logging.Logger | None = None) -> dict[str, Any]:
    logger = logger or log
    stage, tok_dir = train_stage(cfg)
    run_dir = stage.out_dir
    if done := stage.up_to_date():
        logger.info("train: up to date (%s)", run_dir)
        return done
    from tasks.model import quantization_record, resolve_base

    run_dir.mkdir(parents=True, exist_ok=True)
    dump_resolved(cfg, run_dir / "config.yaml")
    base = resolve_base(cfg.model, cfg.root / "models")
    write_json_atomic(run_dir / "inputs.json", {
        "base": base, "tokenized_dir": str(tok_dir), "stage_fingerprint": stage.fingerprint,
        "stage_config": stage.config, "stage_inputs": stage.inputs,
        "quantization": quantization_record(cfg.model, base),
    })
    cmd = launch_command(cfg, run_dir)
    logger.info("train: launching %s", " ".join(cmd))
    rc = supervise(cmd, logger)
    if rc == EXIT_PREEMPTED:
        raise RuntimeError(f"training was preempted and saved a checkpoint in {run_dir}; run it again to resume")
    if rc != 0:
        raise RuntimeError(f"training worker exited with status {rc}; see the log above and {run_dir}")
    return require_manifest(run_dir, "train")


def supervise(cmd: list[str], logger: logging.Logger) -> int:
    """Run the worker in its own process group, stream its output line by line into the log, and
    make sure no rank outlives us (cancellation, Ctrl-C, or an exception here kills the group)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@task(name="train")
def train(cfg_dict: dict) -> dict:
    from prefect.logging import get_run_logger

    return run_train(config_from_dict(cfg_dict), get_run_logger())


# ------------------------------------------------------------------------------ checkpoints
def _tensor_files(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file() and p.name != "checkpoint.json"}


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint whose files all verify; a torn or corrupted one is skipped with a message."""
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    for ck in reversed(ckpts):
        meta = ck / "checkpoint.json"
        if not meta.is_file():
            log.warning("checkpoint %s has no checkpoint.json (partial write?): skipped", ck)
            continue
        want = json.loads(meta.read_text())["files"]
        if _tensor_files(ck) != want:
            log.warning("checkpoint %s fails its sha256 check: skipped", ck)
            continue
        return ck
    return None


# ---------------------------------------------------------------------------------- the loop
def train_worker(run_dir: Path) -> int:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import get_scheduler

    from tasks.evaluate import eval_losses, load_eval_sets
    from tasks.model import load_base, load_tokenizer, tokenizer_fingerprint
    from tasks.tokenize import DataPosition, PackedShards, check_tokenizer, collate

    cfg = load_config(run_dir / "config.yaml")
    inputs = json.loads((run_dir / "inputs.json").read_text())
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    acc = Accelerator()
    main = acc.is_main_process
    set_seed(cfg.seed + acc.process_index)  # dropout differs per rank, as in any DDP run

    # data: refuse shards made by another tokenizer
    tok = load_tokenizer(inputs["base"], cfg.model)
    tok_dir = Path(inputs["tokenized_dir"])
    check_tokenizer(json.loads((tok_dir / "manifest.json").read_text()), tokenizer_fingerprint(tok), tok_dir)
    train_set = PackedShards(tok_dir / "train")
    eval_sets = load_eval_sets(tok_dir)
    mb, accum, world = tc.micro_batch_size, tc.grad_accum, acc.num_processes
    steps_per_epoch = len(train_set) // world // (mb * accum)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} packed rows cannot fill one step of {world}x{mb}x{accum} rows")
    total_steps = tc.max_steps or math.ceil(tc.epochs * steps_per_epoch)
    tokens_per_step = mb * accum * world * train_set.seq_len

    # model: NF4 base, LoRA on the attention projections
    device_map = {"": acc.local_process_index} if torch.cuda.is_available() else None
    model = load_base(inputs["base"], cfg.model, device_map=device_map)
    model.config.use_cache = False
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lc = cfg.lora
    model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                             target_modules=lc.target_modules, bias=lc.bias, task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=tc.lr, weight_decay=tc.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = get_scheduler(tc.scheduler, opt, num_warmup_steps=tc.warmup_steps, num_training_steps=total_steps)
    model, opt = acc.prepare(model, opt)

    # resume: the newest verified checkpoint restores weights, optimizer, schedule, RNG and data position
    step, tokens_seen, skipped, pos = 0, 0, 0, DataPosition()
    ck = latest_checkpoint(run_dir)
    if ck is not None:
        set_peft_model_state_dict(acc.unwrap_model(model), load_file(ck / "adapter" / "adapter_model.safetensors"))
        opt.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=True))
        st = json.loads((ck / "trainer_state.json").read_text())
        sched.load_state_dict(st["scheduler"])
        step, tokens_seen, skipped = st["step"], st["tokens_seen"], st["skipped_steps"]
        pos = DataPosition(**st["data_position"])
        rng = ck / f"rng-rank{acc.process_index}.pt"
        if rng.is_file():
            torch.set_rng_state(torch.load(rng, weights_only=True))
        if main:
            print(f"resumed from {ck.name}: step {step}, epoch {pos.epoch}, batch {pos.batch}", flush=True)

    # preemption: finish the current step, save, exit with EXIT_PREEMPTED
    stop = {"flag": False}

    def _on_signal(signum, _frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    tracker = Tracker(run_dir, cfg, enabled=main)
    batches = train_set.batches(cfg.seed, mb, pos, acc.process_index, world)
    device = acc.device
    if main:
        print(f"training {total_steps} steps ({steps_per_epoch}/epoch) of {tokens_per_step} tokens; "
              f"{sum(p.numel() for p in params):,} trainable parameters", flush=True)
    t_start, step0, loss_val = time.time(), step, float("nan")

    def save(tag_step: int) -> None:
        save_checkpoint(run_dir, acc, model, opt, sched, {
            "step": tag_step, "tokens_seen": tokens_seen, "skipped_steps": skipped,
            "data_position": {"epoch": pos.epoch, "batch": pos.batch},
        }, inputs, tc)

    while step < total_steps:
        model.train()
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            pos, rows = next(batches)
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            # only the last micro-batch synchronises gradients across ranks
            sync = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(model)
            with sync:
                loss = model(**batch, use_cache=False).loss
                acc.backward(loss / accum)
            loss_sum += loss.detach() / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        # a non-finite loss or gradient on any rank skips the step on every rank
        bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)).float()
        if acc.reduce(bad, reduction="sum").item() > 0:
            skipped += 1
            if main:
                print(f"step {step + 1}: non-finite loss/gradient, step skipped ({skipped} so far)", flush=True)
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        loss_val = acc.reduce(loss_sum, reduction="mean").item()
        elapsed = time.time() - t_start
        tps = (step - step0) * tokens_per_step / max(elapsed, 1e-9)
        eta = (total_steps - step) * tokens_per_step / max(tps, 1e-9)
        rec = {"step": step, "loss": loss_val, "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
               "tokens_seen": tokens_seen, "tokens_per_s": tps, "epoch": pos.epoch + pos.batch * mb * world / max(len(train_set), 1)}
        if step % tc.log_every == 0 or step == total_steps:
            tracker.log(rec)
            if main:
                print(f"step {step}/{total_steps} | loss {loss_val:.4f} | lr {rec['lr']:.2e} | grad {rec['grad_norm']:.3f} "
                      f"| {tps:,.0f} tok/s | ETA {_fmt_eta(eta)}", flush=True)
        if eval_sets and (step % tc.eval_every == 0 or step == total_steps):
            res = eval_losses(acc.unwrap_model(model), eval_sets, max_rows=tc.eval_batches * mb, batch_size=mb, device=device)
            ev = {"step": step, "eval_loss": res["overall"]["loss"],
                  **{f"eval_loss/{c}": r["loss"] for c, r in res["categories"].items()}}
            tracker.log(ev)
            if main:
                print(f"eval @ {step}: loss {ev['eval_loss']:.4f} | " +
                      " ".join(f"{c} {r['loss']:.3f}" for c, r in res["categories"].items()), flush=True)
        if step % tc.save_every == 0 or step == total_steps:
            save(step)
        if stop["flag"]:
            save(step)
            if main:
                print(f"preempted: saved step {step}; exiting with status {EXIT_PREEMPTED}", flush=True)
            tracker.close()
            return EXIT_PREEMPTED

    # the final adapter, in plain PEFT format (safetensors), with what inference must reproduce
    if main:
        final = run_dir / "adapter"
        tmp = run_dir / "adapter.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        acc.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json_atomic(tmp / "quantization.json", inputs["quantization"])
        write_json_atomic(tmp / "lineage.json", {"run_dir": str(run_dir), "base_model": cfg.model.name,
                                                 "tokenized": inputs["stage_inputs"]["tokenized"],
                                                 "train_fingerprint": inputs["stage_fingerprint"]})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_json_atomic(run_dir / "manifest.json", {
            "stage": "train", "fingerprint": inputs["stage_fingerprint"], "config": inputs["stage_config"],
            "inputs": inputs["stage_inputs"],
            "counts": {"steps": step, "tokens_seen": tokens_seen, "skipped_steps": skipped,
                       "train_rows": len(train_set), "final_loss": loss_val,
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


def save_checkpoint(run_dir: Path, acc, model, opt, sched, state: dict[str, Any], inputs: dict, tc) -> None:
    """Write checkpoints/step-N atomically: build in .partial, hash every file, then rename."""
    import torch

    ck_root = run_dir / "checkpoints"
    final = ck_root / f"step-{state['step']}"
    tmp = ck_root / f"step-{state['step']}.partial"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(torch.get_rng_state(), tmp / f"rng-rank{acc.process_index}.pt")
    if acc.is_main_process:
        acc.unwrap_model(model).save_pretrained(tmp / "adapter", safe_serialization=True)
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        write_json_atomic(tmp / "trainer_state.json", {
            **state, "scheduler": sched.state_dict(),
            "train_fingerprint": inputs["stage_fingerprint"], "versions": library_versions(),
        })
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json_atomic(tmp / "checkpoint.json", {"step": state["step"], "files": _tensor_files(tmp)})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        # keep the newest few; never delete before the new one is in place
        done = sorted((p for p in ck_root.glob("step-*") if p.name.split("-")[1].isdigit()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[: -tc.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


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
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    m = run_train(load_config(a.config, a.overrides))
    print(f"train: adapter at {m['adapter']}")


if __name__ == "__main__":
    main()
