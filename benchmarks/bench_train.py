"""Training throughput benchmark: the seed notebook's path vs this project's path, side by side.

    # once, on any machine: Tekken-tokenized demo text packed by this project's own packer
    python -m benchmarks.bench_train prepare-data --out .benchdata/tekken-2048 --seq-len 2048
    # on an H200: the exact Mistral-Small-24B-Instruct architecture, random weights
    python -m benchmarks.bench_train run --arch mistral-small-24b --data .benchdata/tekken-2048 \
        --paths seed,project,project+varlen,project+varlen+fastlora,speed,lowmem
    # on a CPU, the demo model (anyone can run this)
    python -m benchmarks.bench_train run --arch smollm2-135m --batch 2 --seq-len 512

Every row loads the same checkpoint afresh through the real ``from_pretrained`` +
``BitsAndBytesConfig`` path (NF4, double quant, bf16 compute), trains LoRA r32/a64/d0.05 on q,k,v
with PagedAdamW8bit on the same batches (per batch size), and reports tokens/s, MFU, peak memory
and the loss of its first and last step, all rows side by side in one table:

- seed: ``prepare_model_for_kbit_training`` (fp32 up-casting, reentrant full recompute) + PEFT, as
  in the seed's notebook; plain causal batches (attention crosses document boundaries).
- project: ``tasks/train/`` with the fast path off: bf16 everywhere, non-reentrant gradient
  checkpointing, packed rows with per-document attention through transformers' SDPA mask. Every
  project row times the worker's own step function (``tasks.train.worker.train_step``: forward,
  backward, clip, the all-reduced guard decision, PagedAdamW8bit, the schedule), so the table
  measures the code that trains; the seed row times the notebook's step.
- project+<switch>...: one lever at a time (``--paths project+varlen,project+varlen+fastlora``);
- speed / lowmem: the two operating points of issue 6 (``PRESETS``), i.e. tasks/train/ with
  ``train.gradient_checkpointing=false train.micro_batch_size=4`` / ``train.activation_offload=true``.

FLOP convention (MFU): a frozen base does no weight-gradient work, so a token costs about
2N (forward) + 2N (input gradients) = 4N FLOPs plus attention (3 x 2 x seq x heads x head_dim per
layer, causal), where N counts the base's linear-layer parameters. Recomputation is not counted:
MFU here is useful work over the peak (989 TFLOP/s dense bf16 datasheet; 790 measured on an H200).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import time
from pathlib import Path

ARCHS = {
    # mistralai/Mistral-Small-24B-Instruct-2501
    "mistral-small-24b": dict(model_type="mistral", hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
                              tie_word_embeddings=False, rope_theta=1e8, max_position_embeddings=32768,
                              rms_norm_eps=1e-5, sliding_window=None),
    # the demo model's shape (HuggingFaceTB/SmolLM2-135M-Instruct)
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=1e5, max_position_embeddings=8192, rms_norm_eps=1e-5),
}
PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16, datasheet
MEASURED_BF16 = 790e12  # 8192^3 bf16 matmul on random data, measured on an H200 of this workplace


def make_config(arch: str, layers: int | None):
    from transformers import AutoConfig

    spec = dict(ARCHS[arch])
    if layers:
        spec["num_hidden_layers"] = layers
    return AutoConfig.for_model(**spec)


def write_random_checkpoint(cfg, out: Path, shard_bytes: int = 5 << 30, seed: int = 0) -> None:
    """Random bf16 weights, written tensor by tensor as sharded safetensors (never the whole model in
    memory): std 0.02 for matrices, ones for norms."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if (out / "model.safetensors.index.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    shard, size, weight_map, n = {}, 0, {}, 0
    names = list(meta.state_dict().items())

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size, n = {}, 0, n + 1

    for key, t in names:
        if key.endswith("norm.weight"):
            val = torch.ones(t.shape, dtype=torch.bfloat16)
        else:
            val = (torch.randn(t.shape, generator=gen, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        shard[key] = val
        size += val.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(out)


def prepare_data(out: Path, seq_len: int, texts_dir: Path) -> None:
    """Tekken-tokenize the demo corpus (extracted texts, or the raw demo site) and pack it with
    this project's packer into Arrow shards."""
    import mistral_common
    import pyarrow.parquet as pq
    from transformers import MistralCommonBackend

    from tasks.tokenize.pack import Packer, ShardWriter

    tok = MistralCommonBackend(tokenizer_path=Path(mistral_common.__file__).parent / "data" / "tekken_240911.json")
    texts = []
    for f in sorted(texts_dir.glob("*.parquet")):
        if f.stem != "rejects":
            texts += pq.read_table(f, columns=["text"]).column("text").to_pylist()
    if not texts:
        raise FileNotFoundError(f"no extracted texts in {texts_dir}; run `d2a stage extract --config configs/demo.yaml` first")
    w = ShardWriter(out / "train", seq_len, len(tok), rows_per_shard=1024)
    p = Packer(w, eos_id=tok.eos_token_id, pad_id=tok.eos_token_id)
    for t in texts:
        p.add(tok.encode(t, add_special_tokens=False), 0)
    p.close()
    (out / "info.json").write_text(json.dumps({"tokenizer": "tekken_240911", "vocab": len(tok), "seq_len": seq_len,
                                               "rows": w.rows, "tokens": p.tokens, "documents": p.docs}))
    print(f"packed {p.docs} documents, {p.tokens} Tekken tokens into {w.rows} rows of {seq_len}")


def linear_params(cfg) -> int:
    h, i, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    return L * per_layer + h * v  # the LM head is a matmul on every token; embeddings are a lookup


def flops_per_token(cfg, seq_len: int) -> float:
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 3 * 2 * seq_len * cfg.num_attention_heads * hd * cfg.num_hidden_layers
    return 4 * linear_params(cfg) + attn


def batches(data: Path | None, cfg, batch: int, seq_len: int, n: int, seed: int = 0):
    """n batches as dicts of tensors (input_ids, labels, position_ids), the same for every path."""
    import numpy as np
    import torch

    from tasks.tokenize.loader import PackedShards, collate

    if data is not None:
        shards = PackedShards(data / "train")
        if shards.seq_len != seq_len:
            raise ValueError(f"{data} holds rows of {shards.seq_len} tokens, asked for {seq_len}")
        order = np.random.default_rng(seed).permutation(len(shards))
        out = []
        for k in range(n):
            idx = [int(order[(k * batch + j) % len(order)]) for j in range(batch)]
            out.append(collate(shards.rows(idx)))
        return out
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (n, batch, seq_len), generator=g)
    return [{"input_ids": x, "labels": x.clone(), "position_ids": torch.arange(seq_len).expand(batch, -1).clone()} for x in ids]


def run_seed_path(name: str, model, data, steps: int, warmup: int, lr: float, device) -> dict:
    """The seed notebook's step, written out as the notebook's Trainer does it: forward, backward,
    clip, PagedAdamW8bit, on plain causal LM batches (its collator knows no document boundaries)."""
    import bitsandbytes as bnb
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=lr)
    model.train()

    def step(b: dict) -> float:
        b = {k: v.to(device) for k, v in b.items()}
        loss = model(input_ids=b["input_ids"], labels=b["input_ids"], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return _time_steps(name, step, data, steps, warmup, device)


def run_project_path(name: str, model, data, steps: int, warmup: int, lr: float, device) -> dict:
    """The worker's real step, ``tasks.train.worker.train_step``, on a State built as the worker's
    setup builds it for one process (accelerate-prepared model and optimizer, the worker's optimizer
    and divergence guard): forward/backward, clip, the all-reduced decision, the update, the schedule.
    One micro-batch per step (the table's batch is the micro-batch; accumulation repeats the same work)."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from tasks.core.config import TrainConfig
    from tasks.tokenize.loader import DataPosition
    from tasks.train.guard import Guard
    from tasks.train.worker import State, build_optimizer, train_step

    batch = data[0]["input_ids"].shape[0]
    tc = TrainConfig(micro_batch_size=batch, grad_accum=1, lr=lr, warmup_steps=0, scheduler="constant",
                     max_grad_norm=1.0, optimizer="paged_adamw_8bit")
    acc = Accelerator(cpu=device.type != "cuda")
    model = acc.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = acc.prepare(build_optimizer(tc, params))
    state = State(tc=tc, acc=acc, model=model, params=params, opt=opt, sched=get_scheduler("constant", opt),
                  plan={"tokens_per_step": data[0]["input_ids"].numel(), "batches_per_epoch": len(data)},
                  guard=Guard(tc))

    def step(b: dict) -> float:
        r = train_step(state, [(DataPosition(0, state.step + 1), b)])
        if r.skipped:
            raise RuntimeError(f"step {state.step} skipped by the divergence guard: {r.skipped}")
        return r.loss

    return _time_steps(name, step, data, steps, warmup, device)


def _time_steps(name: str, step, data, steps: int, warmup: int, device) -> dict:
    """Median wall time of ``step(batch)`` after ``warmup`` untimed steps (GPU synchronised)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for s in range(warmup + steps):
        b = data[s % len(data)]
        t0 = time.perf_counter()
        losses.append(step(b))
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if s >= warmup:
            times.append(dt)
        print(f"  {name} step {s}: loss {losses[-1]:.4f}  {dt:.2f}s", flush=True)
    tokens = data[0]["input_ids"].numel()
    times.sort()
    med = times[len(times) // 2]
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    return {"path": name, "batch": data[0]["input_ids"].shape[0], "tokens_per_s": tokens / med, "step_s_median": med,
            "peak_gib": peak, "reserved_gib": reserved, "first_loss": losses[0], "last_loss": losses[-1],
            "losses": losses}


# kernel name -> category, first match wins (cuBLAS/CUTLASS GEMMs, bitsandbytes, flash, liger's Triton, ...)
KERNEL_CATEGORIES = [
    ("attention", r"flash|fmha|attention"),
    ("gemm", r"gemm|cutlass|nvjet|xmma|sm90_|ampere_|cublas"),
    ("nf4 dequant", r"kDequantize|dequantize|_nf4_dequant"),
    ("dropout", r"bernoulli|philox|fused_dropout|distribution|_dropout_keep"),
    ("liger", r"rms_norm|rope|swiglu|liger|cross_entropy"),
    ("optimizer", r"kOptimizer|adam|Adam|kPreconditionOptimizer|multi_tensor"),
    ("copy / cast", r"copy|Memcpy|Memset|cast|CatArrayBatched"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|reduce"),
]


def kernel_breakdown(prof, wall_s: float, top: int = 25) -> str:
    """The GPU time of one profiled step by kernel category and the top kernels, as text."""
    cats: dict[str, float] = {}
    kernels = []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0)
        if not t or str(getattr(ev, "device_type", "")).split(".")[-1] != "CUDA":
            continue
        cat = next((c for c, rx in KERNEL_CATEGORIES if re.search(rx, ev.key)), "other")
        cats[cat] = cats.get(cat, 0.0) + t / 1e6
        kernels.append((t / 1e6, ev.count, cat, ev.key))
    busy = sum(cats.values())
    lines = [f"GPU busy {busy * 1e3:,.0f} ms of a {wall_s * 1e3:,.0f} ms step ({busy / wall_s:.1%})"]
    for c, t in sorted(cats.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {c:<16}{t * 1e3:>9,.1f} ms {t / wall_s:>7.1%}")
    lines.append(f"  top {top} kernels:")
    for t, n, c, k in sorted(kernels, reverse=True)[:top]:
        lines.append(f"  {t * 1e3:>9,.1f} ms {n:>6}x  [{c}] {k[:110]}")
    return "\n".join(lines)


def profile_step(name: str, model, b: dict, device, out_dir: str | None, trace: bool = False) -> None:
    """One more training step (forward, backward; no optimizer) under torch.profiler: where the GPU
    time goes, printed and written next to --out."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    b = {k: v.to(device) for k, v in b.items()}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        model(**b, use_cache=False).loss.backward()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    text = kernel_breakdown(prof, wall)
    print(f"  profile of {name} (forward + backward):\n{text}", flush=True)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        stem = Path(out_dir) / f"profile-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
        stem.with_suffix(".txt").write_text(text + "\n\n" + prof.key_averages().table(sort_by="self_cuda_time_total",
                                                                                       row_limit=60))
        if trace:  # chrome://tracing or ui.perfetto.dev; gzip: a step's trace is tens of MB
            import gzip

            raw = stem.with_suffix(".json")
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as f, gzip.open(stem.with_suffix(".json.gz"), "wb") as g:
                g.write(f.read())
            raw.unlink()


def lora_cfg(dropout: float = 0.05):
    from peft import LoraConfig

    return LoraConfig(r=32, lora_alpha=64, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj"],
                      bias="all", task_type="CAUSAL_LM")


# Rows of the table. A row is a base path plus modifiers and a batch: "project+liger+varlen@4".
#   seed         the seed notebook (prepare_model_for_kbit_training, fp32 up-cast, reentrant recompute,
#                unpacked batches)
#   project      tasks/train/ with every fast-path switch off: bf16, non-reentrant recompute, packed
#                rows through transformers' SDPA with a per-document mask, PEFT's LoRA forward
#   +liger       liger-kernel RoPE/RMSNorm/SwiGLU/fused linear cross-entropy  (train.liger_kernel)
#   +varlen      varlen flash attention over the documents                       (train.attention=varlen)
#   +fastlora    the fused NF4+LoRA autograd function                            (train.fast_lora)
#   +kernels     Triton NF4 dequantization and one-pass LoRA dropout             (train.triton_kernels)
#   +norecompute no gradient checkpointing                                       (train.gradient_checkpointing=false)
#   +ckptN       recompute only the first N decoder layers                       (train.recompute_layers=N)
#   +offload     checkpoint inputs in pinned CPU memory                          (train.activation_offload)
#   +drop0       LoRA dropout 0 instead of the recipe's 0.05 (Unsloth's fast path needs 0)
# The two operating points of issue 6:
PRESETS = {
    "speed": "project+liger+varlen+fastlora+kernels+norecompute@4",
    "lowmem": "project+liger+varlen+fastlora+kernels+offload",
}
MODS = ("liger", "varlen", "fastlora", "kernels", "norecompute", "offload")


def parse_row(spec: str, default_batch: int, project_mods: list[str]) -> dict:
    label = spec
    base, _, batch = spec.partition("@")
    parts = base.split("+")
    if parts[0] in PRESETS:
        pb, _, pbatch = PRESETS[parts[0]].partition("@")
        parts = pb.split("+") + parts[1:]
        batch = batch or pbatch
    if parts[0] not in ("seed", "project"):
        raise ValueError(f"row {spec!r}: starts with seed, project or one of {sorted(PRESETS)}")
    mods = parts[1:] + (project_mods if parts[0] == "project" and label == "project" else [])
    row = {"label": label if label != "project" or not project_mods else "+".join(["project", *project_mods]),
           "seed": parts[0] == "seed", "batch": int(batch) if batch else default_batch,
           "liger": False, "varlen": False, "fastlora": False, "kernels": False, "recompute": True,
           "recompute_layers": None,
           "offload": False, "dropout": None}
    for m in mods:
        if m in ("liger", "varlen", "fastlora", "kernels", "offload"):
            row[m] = True
        elif m == "drop0":
            row["dropout"] = 0.0
        elif m == "norecompute":
            row["recompute"] = False
        elif m.startswith("ckpt") and m[4:].isdigit():
            row["recompute"], row["recompute_layers"] = True, int(m[4:])
        else:
            raise ValueError(f"row {spec!r}: unknown modifier {m!r} (known: {', '.join(MODS)}, drop0, ckptN)")
    if row["seed"] and any(row[k] for k in ("liger", "varlen", "fastlora", "kernels", "offload")):
        raise ValueError(f"row {spec!r}: the seed path takes no modifiers")
    return row


def run(args) -> None:
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tasks.core.model import disable_cpu_inference_repack, quiet_libraries
    from tasks.train import fastpath

    quiet_libraries()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = make_config(args.arch, args.layers)
    ckpt = Path(args.ckpt_dir) / f"{args.arch}-{cfg.num_hidden_layers}l"
    t0 = time.time()
    write_random_checkpoint(cfg, ckpt)
    print(f"checkpoint ready in {time.time() - t0:.0f}s: {ckpt}", flush=True)
    project_mods = [m for m, on in (("liger", args.liger), ("varlen", args.varlen), ("fastlora", args.fast_lora),
                                    ("norecompute", args.no_recompute), ("offload", args.offload)) if on]
    if args.recompute_layers is not None:
        project_mods.append(f"ckpt{args.recompute_layers}")
    rows = [parse_row(p, args.batch, project_mods) for p in args.paths.split(",") if p]
    if not cuda:  # liger's kernels and offloading need CUDA: on a CPU the presets run without them
        for row in rows:
            if row["liger"] or row["offload"]:
                row["liger"] = row["offload"] = False
                row["label"] += " (CPU: no liger/offload)"
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    fpt = flops_per_token(cfg, args.seq_len)
    data_by_batch: dict[int, list] = {}
    results: dict[str, dict] = {}
    if cuda and any(r["varlen"] for r in rows):
        fn = fastpath.varlen_kernel()
        print(f"varlen kernel: {'none in this torch' if fn is None else fn.__module__ + '.varlen_attn'}", flush=True)
    # liger patches the model classes for good: every row without it runs first
    liger_applied = False
    for row in sorted(rows, key=lambda r: r["liger"]):
        if row["batch"] not in data_by_batch:
            data_by_batch[row["batch"]] = batches(Path(args.data) if args.data else None, cfg, row["batch"],
                                                  args.seq_len, args.steps + args.warmup)
        print(f"== {row['label']} (batch {row['batch']})", flush=True)
        pm = model = None
        try:
            if row["liger"] and not liger_applied:
                from liger_kernel.transformers import _apply_liger_kernel

                _apply_liger_kernel(cfg.model_type, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
                liger_applied = True
            t0 = time.time()
            model = AutoModelForCausalLM.from_pretrained(
                str(ckpt), quantization_config=q, dtype=torch.bfloat16, device_map={"": 0} if cuda else None,
                attn_implementation=fastpath.register_attention() if row["varlen"] else args.attn)
            disable_cpu_inference_repack(model)
            print(f"  loaded NF4 in {time.time() - t0:.0f}s" + (f"; GPU memory {torch.cuda.memory_allocated() / 2**30:.1f} GiB"
                                                              if cuda else ""), flush=True)
            if row["seed"]:
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
            else:
                fp = fastpath.FastPath(attention="varlen" if row["varlen"] else "sdpa", liger=row["liger"],
                                       fast_lora=row["fastlora"], recompute=row["recompute"],
                                       recompute_layers=row["recompute_layers"], offload=row["offload"] and cuda,
                                       kernels=row["kernels"] and cuda)
                fastpath.prepare_base(model, fp)
            torch.manual_seed(0)
            pm = get_peft_model(model, lora_cfg(args.lora_dropout if row["dropout"] is None else row["dropout"]))
            if not row["seed"]:
                fastpath.prepare_peft(pm, fp)
            run_row = run_seed_path if row["seed"] else run_project_path
            r = run_row(row["label"], pm, data_by_batch[row["batch"]], args.steps, args.warmup, 2e-4, device)
            if args.profile and cuda:
                profile_step(row["label"], pm, data_by_batch[row["batch"]][0], device, args.profile, args.trace)
            off = getattr(model, "_d2a_offload", None)
            if off is not None:
                r["offloaded_gib"] = off.bytes_offloaded / 2**30
            results[row["label"]] = r
        except Exception as e:  # noqa: BLE001 - one failing row (out of memory, say) must not lose the others
            print(f"  {row['label']} failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            results[row["label"]] = {"path": row["label"], "batch": row["batch"], "error": f"{type(e).__name__}: {e}"}
        del pm, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    print()
    print(f"arch {args.arch} ({cfg.num_hidden_layers} layers), seq {args.seq_len}, LoRA dropout {args.lora_dropout}, "
          f"{'GPU ' + torch.cuda.get_device_name(0) if cuda else 'CPU'}, {fpt / 1e9:.1f} GFLOP/token (4N + attention)")
    print(f"{'path':<46}{'batch':>6}{'tokens/s':>10}{'MFU(989)':>10}{'MFU(790)':>10}{'peak GiB':>10}"
          f"{'rsv GiB':>9}{'loss@0':>9}{'loss@end':>9}")
    out = []
    for row in rows:
        r = results[row["label"]]
        out.append(r)
        if "error" in r:
            print(f"{r['path']:<46}{r['batch']:>6}  {r['error'][:90]}")
            continue
        r["mfu_peak"] = r["tokens_per_s"] * fpt / PEAK_BF16
        r["mfu_measured"] = r["tokens_per_s"] * fpt / MEASURED_BF16
        mfu = f"{r['mfu_peak']:>10.1%}{r['mfu_measured']:>10.1%}" if cuda else f"{'-':>10}{'-':>10}"  # GPU peaks
        print(f"{r['path']:<46}{r['batch']:>6}{r['tokens_per_s']:>10,.0f}{mfu}{r['peak_gib']:>10.1f}"
              f"{r['reserved_gib']:>9.1f}{r['first_loss']:>9.4f}{r['last_loss']:>9.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"arch": args.arch, "layers": cfg.num_hidden_layers, "seq_len": args.seq_len,
                                              "flops_per_token": fpt, "results": out,
                                              "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                                              "versions": {"torch": torch.__version__}}, indent=2, default=str))


def bench_kernels(args) -> None:
    """The fast path's Triton kernels against what they replace, on the Mistral-Small-24B shapes
    (one decoder layer's weights, a batch of ``--tokens`` hidden states): time and bandwidth."""
    import bitsandbytes.functional as F
    import torch

    from tasks.train import fastpath, kernels

    if not torch.cuda.is_available():
        raise SystemExit("bench kernels needs a CUDA GPU")
    from triton.testing import do_bench

    cfg = make_config("mistral-small-24b", None)
    h, i = cfg.hidden_size, cfg.intermediate_size
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q": (q_out, h), "k/v": (kv_out, h), "o": (h, q_out), "gate/up/down": (i, h)}
    rows = args.rows
    print(f"{'NF4 dequant (out, in)':<28}{'bnb ms':>9}" + "".join(f"{'rows=' + str(r):>10}" for r in rows)
          + f"{'bnb GB/s':>10}{'best GB/s':>10}  equal")
    layer_bnb, layer_tri = 0.0, [0.0] * len(rows)
    for name, shape in shapes.items():
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
        qw, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        t_bnb = do_bench(lambda qw=qw, qs=qs: F.dequantize_4bit(qw, qs), warmup=10, rep=50)
        t_tri = [do_bench(lambda r=r, qw=qw, qs=qs: kernels.dequantize_nf4(qw, qs, rows=r), warmup=10, rep=50) for r in rows]
        nbytes = qw.numel() + w.numel() * 2 + qs.absmax.numel()  # read packed + absmax, write bf16
        eq = all(torch.equal(F.dequantize_4bit(qw, qs).view(shape), kernels.dequantize_nf4(qw, qs, rows=r)) for r in rows)
        n = 3 if name == "gate/up/down" else 2 if name == "k/v" else 1
        layer_bnb += n * t_bnb
        layer_tri = [a + n * t for a, t in zip(layer_tri, t_tri)]
        print(f"{name + ' ' + str(shape):<28}{t_bnb:>9.3f}" + "".join(f"{t:>10.3f}" for t in t_tri)
              + f"{nbytes / t_bnb / 1e6:>10,.0f}{nbytes / min(t_tri) / 1e6:>10,.0f}  {eq}")
    L = cfg.num_hidden_layers
    print(f"per step (forward + backward, {L} layers): bnb {2 * L * layer_bnb:.1f} ms, triton "
          + ", ".join(f"{2 * L * t:.1f} ms (rows={r})" for r, t in zip(rows, layer_tri)))
    x = torch.randn(args.tokens, h, device="cuda", dtype=torch.bfloat16)
    seed, p = 1234, 0.05

    def torch_drop():
        return x * fastpath.dropout_mask(x.shape, p, seed, x.device, x.dtype)

    t_t = do_bench(torch_drop, warmup=10, rep=50)
    t_k = do_bench(lambda: kernels.dropout_keep(x, p, seed), warmup=10, rep=50)
    per_step = 2 * 3 * L  # q, k, v; forward and backward (plus the in-place one on lora_x)
    print(f"dropout ({args.tokens} x {h}, p={p}): torch bernoulli+mul {t_t:.3f} ms, triton {t_k:.3f} ms; "
          f"x{per_step} a step: {per_step * t_t:.1f} vs {per_step * t_k:.1f} ms")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-data", help="Tekken-tokenize and pack the demo corpus")
    p.add_argument("--out", default=".benchdata/tekken-2048")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--texts", default="data/demo/extracted")
    r = sub.add_parser("run", help="time the seed path and the project path")
    r.add_argument("--arch", choices=sorted(ARCHS), default="mistral-small-24b")
    r.add_argument("--layers", type=int, help="fewer decoder layers (quick looks; report full depth)")
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--seq-len", type=int, default=2048)
    r.add_argument("--steps", type=int, default=4)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--paths", default="seed,project,speed,lowmem",
                   help="comma-separated rows: seed | project | speed | lowmem, each optionally +liger +varlen "
                        "+fastlora +norecompute +ckptN +offload and @batch (see PRESETS)")
    r.add_argument("--data", help="packed shards from prepare-data (default: random tokens)")
    r.add_argument("--ckpt-dir", default=os.environ.get("BENCH_CKPT_DIR", "/tmp/d2a-bench"))
    r.add_argument("--attn", default="sdpa")
    r.add_argument("--liger", action="store_true", help="liger-kernel: fused RoPE/RMSNorm/SwiGLU/linear-CE")
    r.add_argument("--no-recompute", action="store_true", help="project path without gradient checkpointing")
    r.add_argument("--varlen", action="store_true", help="project path with varlen flash attention")
    r.add_argument("--fast-lora", action="store_true", help="project path with the fused NF4+LoRA function")
    r.add_argument("--offload", action="store_true", help="project path offloading checkpoint inputs to CPU")
    r.add_argument("--recompute-layers", type=int, help="project path recomputing only the first N layers")
    r.add_argument("--lora-dropout", type=float, default=0.05, help="the seed recipe's 0.05; 0 compares exactly")
    r.add_argument("--out", help="write the figures as JSON here")
    r.add_argument("--profile", metavar="DIR", help="after timing, profile one step per row (GPU): kernel time by category")
    r.add_argument("--trace", action="store_true", help="with --profile: also write each row's Chrome trace (.json.gz)")
    k = sub.add_parser("kernels", help="time the Triton kernels against what they replace (GPU)")
    k.add_argument("--tokens", type=int, default=8192, help="hidden states in the dropout timing (batch x seq)")
    k.add_argument("--rows", type=int, nargs="+", default=[16, 64], help="dequant tile heights to time")
    a = ap.parse_args(argv)
    if a.cmd == "prepare-data":
        prepare_data(Path(a.out), a.seq_len, Path(a.texts))
    elif a.cmd == "kernels":
        bench_kernels(a)
    else:
        run(a)


if __name__ == "__main__":
    main()
