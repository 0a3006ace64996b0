"""The training loop: one process of a run (``python -m tasks.train worker --run-dir RUN``).

Read it top to bottom as a recipe::

    state = setup(run_dir)     # config, process group, data, model, optimizer; resume from a checkpoint
    code = loop(state)         # train_step() until the plan's end, a preemption or a divergence
    finish(state)              # the final adapter and manifest.json

Everything the process holds lives in one ``State``; the helpers below take it and say what they
change. The run directory is the contract with the stage (tasks/train/stage.py), which launches this
and reads the exit status (see tasks/train/__init__.py for their meaning).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.config import load_config, resolve_path
from tasks.core.manifest import fingerprint, library_versions, write_json_atomic
from tasks.train import guard as guard_
from tasks.train.checkpoint import (
    NonFiniteWeights,
    _tensor_files,
    latest_checkpoint,
    portable_adapter_config,
    save_adapter,
    save_checkpoint,
)
from tasks.train.early_stop import EarlyStop
from tasks.train.faults import DebugHooks
from tasks.train.guard import Guard
from tasks.train.plan import plan_steps
from tasks.train.stage import check_launch
from tasks.train.supervisor import (
    EXIT_PREEMPTED,
    PREEMPTED_MARK,
    ROLLBACK_FILE,
    _process_start,
    _SafeStream,
    _watch_supervisor,
)
from tasks.train.tracker import Tracker, _fmt_eta


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


# ---------------------------------------------------------------------------------- the state
@dataclass
class State:
    """What one training process holds. The first block is all ``train_step`` needs (the benchmark
    builds just that); ``setup`` fills the rest."""

    tc: Any  # TrainConfig
    acc: Any  # accelerate.Accelerator: the process group, device placement, gradient sync
    model: Any  # PEFT model, wrapped by accelerate (DDP/FSDP) where there are several processes
    params: list  # the trainable parameters (what the optimizer steps and the clip sees)
    opt: Any
    sched: Any
    plan: dict[str, int]  # plan_steps(): total_steps, tokens_per_step, batches_per_epoch, ...
    guard: Guard
    fsdp: bool = False
    hooks: DebugHooks = field(default_factory=DebugHooks)
    stop: dict[str, bool] = field(default_factory=lambda: {"flag": False, "orphaned": False})  # set by SIGTERM
    # where training is; saved in every checkpoint
    step: int = 0
    tokens_seen: int = 0
    pos: Any = None  # DataPosition after the newest micro-batch: resume in O(1)
    early: EarlyStop | None = None  # train.early_stopping's memory; saved in every checkpoint
    eval_rows: dict[str, int] = field(default_factory=dict)  # the fixed periodic-eval sample per category
    stop_reason: str | None = None  # why training ended (manifest, metrics, log)
    # the run (set by setup)
    run_dir: Path | None = None
    cfg: Any = None  # PipelineConfig
    inputs: dict[str, Any] = field(default_factory=dict)  # inputs.json: base, shards, fingerprints
    tok: Any = None
    tok_fp: str = ""
    train_set: Any = None  # PackedShards
    eval_sets: dict[str, Any] = field(default_factory=dict)
    batches: Any = None  # the loader's iterator, positioned at ``pos``
    tracker: Tracker | None = None
    # this launch
    resumed_from: str | None = None
    last_eval: tuple[int, float] | None = None  # (step, loss): recorded in the checkpoint of that step
    loss: float = float("nan")
    t_start: float = 0.0
    tokens0: int = 0
    _orders: dict[int, Any] = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def device(self):
        return self.acc.device


@dataclass
class StepResult:
    loss: float  # mean over ranks and micro-batches
    grad_norm: float
    skipped: str | None  # why the update was not applied
    diverged: str | None  # why training has diverged (the loop rolls back or stops)
    stopping: bool  # some rank was told to stop (SIGTERM): save and exit after this step


# ---------------------------------------------------------------------------------- setup
def setup(run_dir: Path) -> State:
    """Everything before the first step, in the order the results depend on: the seeds frame the
    LoRA init (same on every rank) and then dropout (different per rank), and a checkpoint's adapter
    goes in before the model is wrapped, its optimizer and RNG after."""
    # read by the CUDA caching allocator at its first allocation: growable segments keep reserved
    # memory within ~1 GiB of allocated at the speed point (benchmarks/BENCH_NOTES.md) instead of fragmenting
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from tasks.core.model import quiet_libraries

    quiet_libraries()  # before bitsandbytes is imported: it logs a notice about optional hub kernels
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    t_enter = time.time()  # startup phases go to metrics.jsonl ("startup"): launch-to-first-step is overhead on every resume
    log_file = run_dir / f"worker-rank{os.environ.get('RANK', '0')}.log"
    sys.stdout, sys.stderr = _SafeStream(sys.stdout, log_file), _SafeStream(sys.stderr, log_file)
    cfg = load_config(run_dir / "config.yaml")
    inputs = json.loads((run_dir / "inputs.json").read_text())
    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    if tc.deterministic:  # bitwise-reproducible kernels (CUDA needs a fixed cuBLAS workspace)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    # without a GPU, accelerate only forms a process group (gloo) when told it is a CPU run
    acc = Accelerator(cpu=not torch.cuda.is_available())
    fsdp = acc.distributed_type == DistributedType.FSDP
    if fsdp:
        check_launch(cfg)  # quant_storage must equal the compute dtype
    set_seed(cfg.seed)  # the same LoRA init on every rank

    tok, tok_fp, train_set, eval_sets = _load_data(inputs, cfg)
    # token budgets (max_tokens, warmup/eval/save in tokens) become steps once: see plan_steps
    plan = plan_steps(tc, len(train_set), train_set.seq_len, acc.num_processes)

    t_model = time.time()
    model = _build_model(inputs["base"], cfg, acc, fsdp)
    t_model = time.time() - t_model

    t_resume = time.time()
    ck, ck_state = _newest_checkpoint(run_dir, acc, tok_fp)
    _load_adapter(model, ck, tc)
    rollback = guard_.pending_rollback(run_dir, ck)
    set_seed(cfg.seed + acc.process_index)  # dropout differs per rank, as in any DDP run
    model, params, opt, sched = _wrap_and_optimize(model, cfg, acc, fsdp, plan)

    from tasks.tokenize.loader import DataPosition

    s = State(tc=tc, acc=acc, model=model, params=params, opt=opt, sched=sched, plan=plan, guard=Guard(tc),
              fsdp=fsdp, hooks=DebugHooks.from_env(), pos=DataPosition(), run_dir=run_dir, cfg=cfg,
              inputs=inputs, tok=tok, tok_fp=tok_fp, train_set=train_set, eval_sets=eval_sets)
    if ck is not None:
        _restore(s, ck, ck_state, rollback)
    s.early = EarlyStop.from_config(tc.early_stopping, ck_state.get("early_stopping"))

    # preemption: SIGTERM/SIGINT (or losing the supervisor) finish the step, save, exit 75
    def _on_signal(signum, _frame):
        s.stop["flag"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    _watch_supervisor(s.stop)

    s.tracker = Tracker(run_dir, cfg, enabled=s.main)
    s.batches = train_set.batches(cfg.seed, tc.micro_batch_size, s.pos, s.rank, s.world)  # O(1): starts at pos, no replay
    now = time.time()
    startup = {"step": s.step, "event": "startup", "resumed_from": s.resumed_from,
               "process_s": round(now - _process_start(t_enter), 2), "model_load_s": round(t_model, 2),
               "resume_s": round(now - t_resume, 2)}  # resume_s: PEFT wrap + checkpoint + optimizer + data position
    s.tracker.log(startup)
    if s.main:
        print(f"startup: {startup['process_s']:.1f} s since the process started, of which model load "
              f"{startup['model_load_s']:.1f} s and wrap/resume {startup['resume_s']:.1f} s", flush=True)
        print(f"training {plan['total_steps']} steps ({plan['steps_per_epoch']}/epoch, {_total_tokens(s):,} tokens) "
              f"of {plan['tokens_per_step']:,} tokens on {s.world} process(es); "
              f"{sum(p.numel() for p in params):,} trainable parameters", flush=True)
    if eval_sets:
        s.eval_rows = _eval_sample(s, ck_state.get("eval_rows"))
    return s


def _load_data(inputs: dict[str, Any], cfg):
    """The tokenizer and the shards; shards made by another tokenizer are refused."""
    from tasks.core.model import load_tokenizer, tokenizer_fingerprint
    from tasks.tokenize.loader import PackedShards, check_tokenizer
    from tasks.train.heldout import load_eval_sets

    tok = load_tokenizer(inputs["base"], cfg.model)
    tok_fp = tokenizer_fingerprint(tok)
    tok_dir = Path(inputs["tokenized_dir"])
    check_tokenizer(json.loads((tok_dir / "manifest.json").read_text()), tok_fp, tok_dir)
    return tok, tok_fp, PackedShards(tok_dir / "train"), load_eval_sets(tok_dir)


def _build_model(base: str, cfg, acc, fsdp: bool):
    """NF4 base + LoRA on the attention projections, with the fast path (tasks/train/fastpath.py:
    varlen attention, liger kernels, the fused LoRA function, selective recomputation / activation
    offload) as the train section switches it on for this machine. Under FSDP no device_map: the
    model is loaded where accelerate/transformers put it and FSDP shards it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tasks.core.model import load_base
    from tasks.train import fastpath

    device_map = {"": acc.local_process_index} if torch.cuda.is_available() and not fsdp else None
    fp = fastpath.resolve(cfg.train, fsdp=fsdp)
    if acc.is_main_process:
        print(f"fast path: {fp.describe()}", flush=True)
    if fp.liger:
        apply_liger(base)
    model = load_base(base, cfg.model, device_map=device_map, attn_implementation=fp.attn_implementation)
    fastpath.prepare_base(model, fp)
    lc = cfg.lora
    model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                             target_modules=lc.target_modules, bias=lc.bias, task_type="CAUSAL_LM"))
    fastpath.prepare_peft(model, fp)
    return model


def _newest_checkpoint(run_dir: Path, acc, tok_fp: str) -> tuple[Path | None, dict[str, Any]]:
    """The newest verified checkpoint and its trainer state, refused when it cannot continue here."""
    if acc.is_main_process:  # a write that a crash interrupted: never complete, never read
        for p in (run_dir / "checkpoints").glob("step-*.partial"):
            shutil.rmtree(p, ignore_errors=True)
    ck = latest_checkpoint(run_dir)
    if ck is None:
        return None, {}
    st = json.loads((ck / "trainer_state.json").read_text())
    world = acc.num_processes
    if st.get("world_size", world) != world:
        raise ValueError(f"{ck} was written by {st['world_size']} processes, this launch has {world}: the data "
                         f"position is per rank, so resume with train.num_processes x train.nnodes = {st['world_size']}")
    if st.get("tokenizer_fingerprint", tok_fp) != tok_fp:
        raise ValueError(f"{ck} was trained with tokenizer {st['tokenizer_fingerprint'][:16]}, this is {tok_fp[:16]}")
    return ck, st


def _load_adapter(model, ck: Path | None, tc) -> None:
    """The checkpoint's adapter, else train.init_adapter (continue from an earlier adapter, e.g. the
    promoted one, instead of LoRA's zero init). Before wrapping: the same code for one process, DDP and FSDP."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if ck is not None:
        set_peft_model_state_dict(model, load_file(ck / "adapter" / "adapter_model.safetensors"))
    elif tc.init_adapter:
        init = resolve_path(tc.init_adapter) / "adapter_model.safetensors"
        if not init.is_file():
            raise FileNotFoundError(f"train.init_adapter: {init} not found")
        result = set_peft_model_state_dict(model, load_file(init))
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"train.init_adapter: {init} does not fit this model/LoRA config "
                             f"(unexpected keys like {result.unexpected_keys[:3]})")


def _wrap_and_optimize(model, cfg, acc, fsdp: bool, plan: dict[str, int]):
    """Wrap for the process layout, then build the optimizer on what the wrapper trains (FSDP replaces
    the parameters with flat shards; an optimizer over the originals would step tensors no longer in
    use). Returns (model, trainable params, optimizer, scheduler)."""
    import torch
    from transformers import get_scheduler

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
    model = acc.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = acc.prepare(build_optimizer(cfg.train, params))
    sched = get_scheduler(cfg.train.scheduler, opt, num_warmup_steps=plan["warmup_steps"],
                          num_training_steps=plan["total_steps"])
    return model, params, opt, sched


def build_optimizer(tc, params):
    import torch

    if tc.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=tc.lr, weight_decay=tc.weight_decay)
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)


def _restore(s: State, ck: Path, st: dict[str, Any], rollback: dict[str, Any] | None) -> None:
    """Optimizer, schedule, counters, RNG and data position from a checkpoint; for a rollback
    relaunch, the data moves on past the batches that diverged and the LR is lowered."""
    import torch

    from tasks.tokenize.loader import DataPosition

    opt_file = ck / (f"optimizer-rank{s.rank}.pt" if s.fsdp else "optimizer.pt")
    s.opt.load_state_dict(torch.load(opt_file, weights_only=True))
    s.sched.load_state_dict(st["scheduler"])
    s.step, s.tokens_seen = st["step"], st["tokens_seen"]
    s.guard.skipped, s.guard.rollbacks = st["skipped_steps"], st.get("rollbacks", 0)
    s.pos = DataPosition(**st["data_position"])
    s.resumed_from = ck.name
    rng_file = ck / f"rng-rank{s.rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        rng = rng if isinstance(rng, dict) else {"cpu": rng}
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    if rollback:
        s.pos = guard_.apply_rollback(rollback, s.guard, s.opt, s.sched)
    if s.main:
        print(f"resumed from {ck.name}: step {s.step}, epoch {s.pos.epoch}, batch {s.pos.batch}"
              + (f" (rollback {s.guard.rollbacks}: data moved on to batch {s.pos.batch}, lr x{rollback['lr_factor']})"
                 if rollback else ""), flush=True)


# ---------------------------------------------------------------------------------- one step
def train_step(s: State, micro: list[tuple[Any, dict[str, Any]]]) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches ``[(data position after it, batch of
    CPU tensors), ...]``: forward/backward (gradients synchronised across ranks on the last one only),
    clip, one all-reduce that decides for every rank together, then the update -- or none, when the
    guard says the step is bad. The schedule follows steps (= tokens), taken or skipped."""
    import torch

    acc, model, tc, device = s.acc, s.model, s.tc, s.device
    accum = len(micro)
    model.train()
    loss_sum = torch.zeros((), device=device)
    for i, (pos, cpu_batch) in enumerate(micro):
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        with contextlib.nullcontext() if i == accum - 1 else acc.no_sync(model):
            loss = model(**batch, use_cache=False).loss
            if s.hooks.nan_steps or s.hooks.spike_steps:  # test hook, keyed by the data an uninterrupted run sees
                loss = s.hooks.poison(loss, (pos.epoch * s.plan["batches_per_epoch"] + pos.batch - 1) // accum + 1, s.rank)
            acc.backward(loss / accum)
        loss_sum += loss.detach() / accum
    # FSDP clips through the wrapped model (its norm spans every shard), hence all parameters
    grad_norm = acc.clip_grad_norm_(model.parameters() if s.fsdp else s.params, tc.max_grad_norm)
    grad_norm = torch.as_tensor(grad_norm, device=device, dtype=torch.float32)
    # one all-reduce decides for every rank together: [any non-finite, any stop signal, loss sum]
    nonfinite = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)).float()
    flags = acc.reduce(torch.stack([nonfinite, torch.tensor(float(s.stop["flag"]), device=device),
                                    loss_sum.float()]), reduction="sum")
    bad, stopping, loss_val = flags[0].item() > 0, flags[1].item() > 0, flags[2].item() / s.world
    skipped, diverged = s.guard.judge(bad, loss_val)
    if skipped is None:
        s.opt.step()
    s.sched.step()
    s.opt.zero_grad(set_to_none=True)
    s.step += 1
    s.tokens_seen += s.plan["tokens_per_step"]
    s.pos = micro[-1][0]
    s.loss = loss_val
    return StepResult(loss_val, float(grad_norm), skipped, diverged, stopping)


# ---------------------------------------------------------------------------------- the loop
def loop(s: State) -> int | None:
    """Train to the plan's last step. Returns an exit status when the run must end early
    (EXIT_PREEMPTED, EXIT_ROLLBACK, EXIT_DIVERGED), None when it reached its end."""
    from tasks.tokenize.loader import collate

    tc, plan = s.tc, s.plan
    total = plan["total_steps"]
    s.t_start, s.tokens0 = time.time(), s.tokens_seen
    while s.step < total:
        micro = [(pos, collate(rows)) for pos, rows in (next(s.batches) for _ in range(tc.grad_accum))]
        r = train_step(s, micro)
        if r.skipped:
            _log_skip(s, r.skipped, [pos for pos, _ in micro])
        if r.diverged:
            return _diverge(s, r.diverged)
        _log_step(s, r)
        new_best = False
        if s.eval_sets and (s.step % plan["eval_every"] == 0 or s.step == total):
            new_best, s.stop_reason = _evaluate(s)
        # with early stopping, every new lowest held-out loss is checkpointed: that adapter is the one kept
        keep = new_best and s.early.enabled
        try:
            if s.step % plan["save_every"] == 0 or s.step == total or r.stopping or keep or s.stop_reason:
                _save(s)
        except NonFiniteWeights as e:  # never written; the last good checkpoint is the way back
            return _diverge(s, str(e))
        if s.hooks.step_sleep_s:
            time.sleep(s.hooks.step_sleep_s)
        if r.stopping:
            if s.main:
                write_json_atomic(s.run_dir / PREEMPTED_MARK, {"step": s.step, "orphaned": s.stop["orphaned"]})
                print(f"preempted: saved step {s.step}; exiting with status {EXIT_PREEMPTED}", flush=True)
            return _close(s, EXIT_PREEMPTED)
        if s.stop_reason:
            s.tracker.log({"step": s.step, "event": "early_stop", "reason": s.stop_reason})
            return None
    s.stop_reason = _budget_reason(s)
    return None


def _budget_reason(s: State) -> str:
    tc, n = s.tc, s.plan["total_steps"]
    if tc.max_steps:
        return f"reached train.max_steps={tc.max_steps}"
    if tc.max_tokens:
        return f"reached the token budget train.max_tokens={tc.max_tokens:,} ({n} steps, {_total_tokens(s):,} tokens)"
    return f"completed train.epochs={tc.epochs:g} ({n} steps)"


def _total_tokens(s: State) -> int:
    return s.plan["total_steps"] * s.plan["tokens_per_step"]


def _log_step(s: State, r: StepResult) -> None:
    import torch

    total = s.plan["total_steps"]
    elapsed = time.time() - s.t_start
    tps = (s.tokens_seen - s.tokens0) / max(elapsed, 1e-9)
    eta = (_total_tokens(s) - s.tokens_seen) / max(tps, 1e-9)
    rec = {"step": s.step, "loss": r.loss, "lr": s.sched.get_last_lr()[0], "grad_norm": r.grad_norm,
           "tokens_seen": s.tokens_seen, "tokens_per_s": tps, "eta_s": eta,
           "epoch": s.pos.epoch + s.pos.batch / max(s.plan["batches_per_epoch"], 1)}
    if torch.cuda.is_available():
        rec["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(s.device) / 2**30, 2)
    if s.step % s.tc.log_every == 0 or s.step == total:
        s.tracker.log(rec)
        if s.main:
            print(f"step {s.step}/{total} | loss {r.loss:.4f} | lr {rec['lr']:.2e} | grad {r.grad_norm:.3f} "
                  f"| {s.tokens_seen:,}/{_total_tokens(s):,} tok | {tps:,.0f} tok/s | ETA {_fmt_eta(eta)}", flush=True)


def _log_skip(s: State, reason: str, positions: list) -> None:
    """Every rank's rows of the skipped step (rank order), so the batches can be inspected."""
    from accelerate.utils import gather_object

    ids = gather_object([_sample_ids(s, positions)])
    s.tracker.log({"step": s.step, "event": "skipped_step", "reason": reason, "skipped_steps": s.guard.skipped,
                   "sample_ids": ids, "data_positions": [[p.epoch, p.batch] for p in positions]})
    if s.main:
        print(f"step {s.step}: {reason}, step skipped ({s.guard.skipped} so far); sample ids {ids}", flush=True)


def _sample_ids(s: State, positions: list) -> list[int]:
    """Row indices of the micro-batches that ended at these positions."""
    mb, out = s.tc.micro_batch_size, []
    for p in positions:
        if p.epoch not in s._orders:
            s._orders.clear()
            s._orders[p.epoch] = s.train_set.order(s.cfg.seed, p.epoch, s.rank, s.world)
        out += [int(i) for i in s._orders[p.epoch][(p.batch - 1) * mb: p.batch * mb]]
    return out


def _eval_model(s: State):
    return s.model if s.fsdp else s.acc.unwrap_model(s.model)


def _all_reduce(s: State):
    return (lambda t: s.acc.reduce(t, reduction="sum")) if s.world > 1 else None


def _eval_sample(s: State, saved: dict[str, int] | None) -> dict[str, int]:
    """Rows per category of the periodic-eval sample: fixed for the whole run (a resumed run reads
    back what the first launch measured). auto: the per-row loss spread on a pilot of
    train.eval_pilot_rows rows (the model as it starts: the base, or init_adapter) gives the rows for
    a standard error below early_stopping.min_delta (tasks.train.heldout.rows_for_standard_error)."""
    import statistics

    from accelerate.utils import gather_object

    from tasks.train.heldout import row_losses, rows_for_standard_error

    tc = s.tc
    want = tc.eval_rows_per_category
    if want is None:
        return dict.fromkeys(s.eval_sets, tc.eval_batches * tc.micro_batch_size)
    if want != "auto":
        return dict.fromkeys(s.eval_sets, want)
    if saved:
        return saved
    target = tc.early_stopping.min_delta
    mine = row_losses(_eval_model(s), s.eval_sets, tc.eval_pilot_rows, s.device, s.rank, s.world)
    everyone = gather_object([mine])  # every rank's share, so every rank computes the same sizes
    rows, stds = {}, {}
    for cat, shards in s.eval_sets.items():
        vals = [v for part in everyone for v in part[cat]]
        stds[cat] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows[cat] = min(len(shards), tc.eval_max_rows_per_category, rows_for_standard_error(stds[cat], target))
    se = {c: stds[c] / rows[c] ** 0.5 for c in rows}
    s.tracker.log({"step": s.step, "event": "eval_sample", "rows": rows, "row_loss_std": stds,
                   "standard_error": se, "target_standard_error": target, "pilot_rows": tc.eval_pilot_rows,
                   "tokens_per_eval": sum(rows.values()) * s.train_set.seq_len})
    if s.main:
        print("periodic eval sample: " + ", ".join(
            f"{c} {rows[c]} rows (std {stds[c]:.3f}, SE {se[c]:.4f})" for c in rows)
            + f"; target SE {target} (train.early_stopping.min_delta)", flush=True)
        short = [c for c in rows if se[c] > target]
        if short:
            print(f"warning: periodic eval sample too small for SE < {target} in {', '.join(short)} "
                  f"(held-out rows or train.eval_max_rows_per_category={tc.eval_max_rows_per_category} bound it)",
                  flush=True)
    return rows


def _evaluate(s: State) -> tuple[bool, str | None]:
    """Held-out loss on the fixed periodic-eval sample, each rank evaluating its share; returns
    (a new lowest loss, why early stopping ends training now or None)."""
    from tasks.train.heldout import eval_losses

    res = eval_losses(_eval_model(s), s.eval_sets, max_rows=s.eval_rows, batch_size=s.tc.micro_batch_size,
                      device=s.device, rank=s.rank, world=s.world, all_reduce=_all_reduce(s))
    ev = {"step": s.step, "eval_loss": res["overall"]["loss"],
          **{f"eval_loss/{c}": r["loss"] for c, r in res["categories"].items()}}
    s.last_eval = (s.step, ev["eval_loss"])
    new_best, stop = s.early.update(s.step, ev["eval_loss"])
    ev["evals_without_improvement"] = s.early.evals_without_improvement
    s.tracker.log(ev)
    if s.main:
        print(f"eval @ {s.step}: loss {ev['eval_loss']:.4f} | " +
              " ".join(f"{c} {r['loss']:.3f}" for c, r in res["categories"].items()), flush=True)
        if stop:
            print(f"step {s.step}: {stop}", flush=True)
    return new_best, stop


def _save(s: State) -> None:
    """checkpoints/step-N: adapter, optimizer, schedule, RNG and what resuming must match."""
    step = s.step
    ev = s.last_eval[1] if s.last_eval and s.last_eval[0] == step else None
    save_checkpoint(s.run_dir, s.acc, s.model, s.opt, s.sched, {
        "step": step, "tokens_seen": s.tokens_seen, "skipped_steps": s.guard.skipped, "rollbacks": s.guard.rollbacks,
        "data_position": {"epoch": s.pos.epoch, "batch": s.pos.batch}, "eval_loss": ev,
        "world_size": s.world, "tokens_per_step": s.plan["tokens_per_step"], "seq_len": s.train_set.seq_len,
        "train_fingerprint": s.inputs["stage_fingerprint"], "config_fingerprint": fingerprint(s.cfg.model_dump(mode="json")),
        "tokenizer_fingerprint": s.tok_fp, "tokenized": s.inputs["stage_inputs"]["tokenized"],
        "early_stopping": s.early.state(), "eval_rows": s.eval_rows,
    }, s.tc, s.params, fsdp=s.fsdp, pause_s=s.hooks.ckpt_pause_s if s.hooks.ckpt_pause_step == step else 0.0)
    s.guard.lr_factor_vs_ck = 1.0
    if s.main:
        (s.run_dir / ROLLBACK_FILE).unlink(missing_ok=True)  # a newer checkpoint holds its effect now


def _diverge(s: State, reason: str) -> int:
    """Roll back (relaunch from the newest good checkpoint, data moving on) or stop, on every rank."""
    code = guard_.on_divergence(s.run_dir, s.guard, s.step, s.pos, reason, latest_checkpoint(s.run_dir), s.main)
    s.tracker.log({"step": s.step, "event": "rollback" if code == guard_.EXIT_ROLLBACK else "diverged", "reason": reason})
    return _close(s, code)


def _close(s: State, code: int) -> int:
    s.tracker.close()
    s.acc.wait_for_everyone()
    return code


# ---------------------------------------------------------------------------------- the end
def finish(s: State) -> int:
    """The final adapter, in plain PEFT format (safetensors), with what inference must reproduce
    (quantization, lineage), and the run's manifest.json: the stage's output. With early stopping
    on, the adapter is the best one (lowest held-out loss), copied from its checkpoint."""
    run_dir, cfg, inputs = s.run_dir, s.cfg, s.inputs
    final, tmp = run_dir / "adapter", run_dir / "adapter.partial"
    if s.main:
        shutil.rmtree(tmp, ignore_errors=True)
    best_ck = _best_checkpoint(s)
    adapter_step = s.step
    if best_ck is not None:  # the same files save_adapter wrote into the checkpoint
        adapter_step = s.early.best_step
        if s.main:
            shutil.copytree(best_ck / "adapter", tmp)
    else:
        save_adapter(s.acc, s.model, tmp, s.fsdp)
    s.tracker.log({"step": s.step, "event": "stopped", "reason": s.stop_reason, "adapter_step": adapter_step,
                   "best_eval_loss": s.early.best_value()})
    if s.main:
        print(f"training stopped at step {s.step}: {s.stop_reason}; adapter from step {adapter_step}"
              + (f" (held-out loss {s.early.best:.4f})" if best_ck is not None else ""), flush=True)
        s.tok.save_pretrained(tmp)
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
            "counts": {"steps": s.step, "tokens_seen": s.tokens_seen, "skipped_steps": s.guard.skipped,
                       "rollbacks": s.guard.rollbacks, "train_rows": len(s.train_set), "final_loss": s.loss,
                       "world_size": s.world, "wall_s": round(time.time() - s.t_start, 1)},
            "stop_reason": s.stop_reason, "adapter_step": adapter_step, "best_eval_loss": s.early.best_value(),
            "best_eval_step": s.early.best_step, "eval_rows_per_category": s.eval_rows,
            "run_dir": str(run_dir), "adapter": str(final),
            "files": {f"adapter/{k}": v for k, v in _tensor_files(final).items()},
            "versions": library_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        print(f"adapter saved to {final}", flush=True)
    return _close(s, 0)


def _best_checkpoint(s: State) -> Path | None:
    """With early stopping, the checkpoint of the lowest held-out loss (None: keep the current model)."""
    if not (s.early.enabled and s.early.best_step is not None):
        return None
    ck = s.run_dir / "checkpoints" / f"step-{s.early.best_step}"
    if not (ck / "adapter" / "adapter_model.safetensors").is_file():  # every rank sees the same shared run dir
        if s.main:
            print(f"warning: the best checkpoint {ck.name} is gone; keeping the adapter of step {s.step}", flush=True)
        return None
    return ck


def train_worker(run_dir: Path) -> int:
    """One process of a run; returns its exit status (0, or EXIT_PREEMPTED/ROLLBACK/DIVERGED)."""
    s = setup(run_dir)
    code = loop(s)
    return finish(s) if code is None else code
