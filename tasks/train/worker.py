"""The training loop (one process of a run; ``python -m tasks.train worker --run-dir RUN``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from tasks.core.config import (
    load_config,
    resolve_path,
)
from tasks.core.manifest import (
    fingerprint,
    library_versions,
    write_json_atomic,
)
from tasks.train.checkpoint import (
    NonFiniteWeights,
    _tensor_files,
    latest_checkpoint,
    portable_adapter_config,
    save_adapter,
    save_checkpoint,
)
from tasks.train.faults import DebugHooks
from tasks.train.plan import plan_steps
from tasks.train.stage import check_launch
from tasks.train.supervisor import (
    DIVERGED_FILE,
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    EXIT_ROLLBACK,
    PREEMPTED_MARK,
    ROLLBACK_FILE,
    _process_start,
    _SafeStream,
    _watch_supervisor,
)
from tasks.train.tracker import Tracker, _fmt_eta

log = logging.getLogger(__name__)



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


# ---------------------------------------------------------------------------------- the loop
def train_worker(run_dir: Path) -> int:
    # read by the CUDA caching allocator at its first allocation: growable segments keep reserved
    # memory within ~1 GiB of allocated at the speed point (benchmarks/BENCH_NOTES.md) instead of fragmenting
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from tasks.core.model import quiet_libraries

    quiet_libraries()  # before bitsandbytes is imported: it logs a notice about optional hub kernels
    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object, set_seed
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import get_scheduler

    from tasks.core.model import load_base, load_tokenizer, tokenizer_fingerprint
    from tasks.tokenize.loader import DataPosition, PackedShards, check_tokenizer, collate
    from tasks.train import fastpath
    from tasks.train.heldout import eval_losses, load_eval_sets

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
    # the fast path (tasks/train/fastpath.py): varlen attention, liger kernels, the fused LoRA function,
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
