"""Benchmark of the train stage at scale (issue 5): data-parallel scaling and time to resume.

    # once, here (needs the demo's split: `make demo`): the demo text, Tekken-tokenized and packed to
    # 2048 by this project's own mix + tokenize stages, and Tekken as a Hugging Face tokenizer
    python -m benchmarks.bench_scaling prepare --out .benchdata/scaling
    # on a machine with 2 GPUs: the exact Mistral-Small-24B architecture, random weights
    python -m benchmarks.bench_scaling run --data .benchdata/scaling --gpus 1 2

Everything runs through the real stage: ``prepare_run`` writes the run directory and the launch
command (plain python for 1 GPU, ``accelerate launch`` with configs/accelerate/ddp.yaml for more),
the worker loads the base with ``from_pretrained`` + NF4, trains LoRA with the production config
(configs/mistral-small-24b.yaml; micro-batch, steps and cadences overridden), and the figures come
from the worker's own ``metrics.jsonl``.

1. Scaling: the same per-GPU micro-batch on 1 and on N GPUs. Throughput is measured between the
   end of step ``--warmup`` and the last step, from rank 0's step timestamps (DDP steps are
   synchronous, so rank 0's clock is every rank's); the scaling factor is N-GPU tokens/s over
   1-GPU tokens/s (ideal N).
2. Resume: a run on the most GPUs is preempted (SIGTERM to the launcher's process group, as a
   scheduler does) after a few steps, which saves a checkpoint at the next step boundary and exits
   75; it is launched again, which resumes; preempted again further on, and resumed again. Each
   launch reports wall time from ``Popen`` to the first step's record, and the worker's own
   ``startup`` record splits it: model load (``from_pretrained`` + quantization + LoRA wrap) and
   resume (adapter, optimizer, RNG, data position). "Beyond model load" is the rest: interpreter
   and library imports, process-group start-up, the checkpoint, and the first step itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from scrapers.schema import REPO_ROOT as REPO

TEKKEN = "tekken_240911.json"


# ---------------------------------------------------------------------------------- prepare
def hf_tekken(out: Path, golden: list[str]):
    """Mistral's Tekken as a Hugging Face tokenizer (the GPU machine has no mistral-common), checked
    to give exactly mistral-common's ids on ``golden``."""
    import mistral_common
    from transformers import AutoTokenizer
    from transformers.integrations.mistral import convert_tekken_tokenizer
    from transformers.tokenization_mistral_common import MistralCommonBackend

    path = Path(mistral_common.__file__).parent / "data" / TEKKEN
    hf = convert_tekken_tokenizer(str(path), chat_template="")
    if hf.pad_token_id is None:
        hf.pad_token = hf.eos_token
    hf.save_pretrained(out)
    hf = AutoTokenizer.from_pretrained(out)  # what the worker will load
    ref = MistralCommonBackend(tokenizer_path=str(path))
    for t in golden:
        a, b = hf.encode(t, add_special_tokens=False), ref.encode(t, add_special_tokens=False)
        if a != b:
            raise AssertionError(f"converted Tekken differs from mistral-common on {t[:60]!r}")
    if (hf.eos_token_id, len(hf)) != (ref.eos_token_id, len(ref)):
        raise AssertionError(f"converted Tekken: eos/vocab {(hf.eos_token_id, len(hf))} != {(ref.eos_token_id, len(ref))}")
    return hf


def prepare(out: Path, demo_root: Path) -> None:
    import pyarrow.parquet as pq

    from tasks.core.manifest import require_manifest
    from tasks.mix import run_mix
    from tasks.tokenize.stage import run_tokenize

    require_manifest(demo_root / "split", "split")
    texts = [t for f in sorted((demo_root / "split" / "train").glob("*.parquet"))
             for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    out.mkdir(parents=True, exist_ok=True)
    tok = hf_tekken(out / "tokenizer", texts[:40] + ["Crème brûlée: 250 ml double cream, 4 yolks. E330 ≤ 0.5 %"])
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(demo_root / "split", data / "split")
    cfg = _config(data, out / "tokenizer", world=1, micro=1, steps=1)
    run_mix(cfg, tokenizer=tok)
    m = run_tokenize(cfg, tokenizer=tok)
    shutil.rmtree(data / "split")
    shutil.rmtree(data / "mix")  # texts; tokenize's manifest keeps the fingerprints that train checks
    print(f"prepared {out}: {m['counts']['train']['rows']} packed rows of 2048 Tekken tokens "
          f"({m['counts']['train']['tokens']:,} tokens)")


def _config(data_root: Path, model: Path, world: int, micro: int, steps: int, run_name: str = "bench",
            liger: str = "auto", extra: dict | None = None):
    from tasks.core.config import load_config

    over = [f"data_root={data_root}", f"run_name={run_name}", f"model.name={model}", "model.tokenizer=null",
            "tokenize.seq_len=2048", "tokenize.rows_per_shard=1024", "tokenize.workers=1",
            f"train.num_processes={world}", f"train.micro_batch_size={micro}", "train.grad_accum=1",
            f"train.max_steps={steps}", "train.warmup_steps=0", f"train.save_every={10**6}",
            f"train.eval_every={10**6}", f"train.liger_kernel={liger}", "tracking.tensorboard=false",
            "tracking.wandb='off'"]
    if world > 1:
        over.append("train.accelerate_config=configs/accelerate/ddp.yaml")
    over += [f"{k}={v}" for k, v in (extra or {}).items()]
    return load_config(REPO / "configs" / "mistral-small-24b.yaml", over)


# -------------------------------------------------------------------------------------- run
def _records(run_dir: Path) -> list[dict]:
    from tasks.core.textio import read_jsonl

    return read_jsonl(run_dir / "metrics.jsonl")


class Launch:
    """One launch of the worker, as the train stage would start it (its own process group)."""

    def __init__(self, cmd: list[str], run_dir: Path, log: Path):
        self.run_dir, self.log = run_dir, log
        self.n0 = len(_records(run_dir))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env, cwd=REPO)

    def new(self) -> list[dict]:
        return _records(self.run_dir)[self.n0:]

    def wait_step(self, k: int, timeout: float = 420) -> dict:
        """The first new step record with step >= k (raises if the worker dies first)."""
        end = time.time() + timeout
        while time.time() < end:
            steps = [r for r in self.new() if "loss" in r and r["step"] >= k]
            if steps:
                return steps[0]
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode} before step {k}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"no step {k} within {timeout} s")

    def preempt(self, timeout: float = 300) -> int:
        os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def finish(self, timeout: float = 900) -> int:
        rc = self.proc.wait(timeout=timeout)
        if rc:
            raise RuntimeError(f"worker exited {rc}:\n{self.log.read_text()[-3000:]}")
        return rc


def throughput(recs: list[dict], warmup: int) -> tuple[float, float]:
    """(tokens/s, peak GiB) from step records after ``warmup`` steps (rank 0's clock)."""
    steps = [r for r in recs if "loss" in r]
    a = next(r for r in steps if r["step"] == warmup)
    b = steps[-1]
    return (b["tokens_seen"] - a["tokens_seen"]) / (b["time"] - a["time"]), max(r.get("gpu_peak_gib", 0) for r in steps)


def run(data: Path, arch: str, gpus: list[int], micro: int, steps: int, warmup: int, liger: str,
        ckpt_root: Path, resume_at: list[int], tiny: bool = False, extra: dict | None = None) -> None:
    import torch

    from benchmarks.bench_train import make_config, write_random_checkpoint
    from tasks.train.checkpoint import latest_checkpoint
    from tasks.train.stage import prepare_run
    from tasks.train.supervisor import EXIT_PREEMPTED

    n_gpu = torch.cuda.device_count()
    if max(gpus) > max(n_gpu, 1) or (n_gpu == 0 and max(gpus) > 1):
        raise SystemExit(f"asked for {max(gpus)} GPUs, {n_gpu} visible")
    model = ckpt_root / (arch + ("-tiny" if tiny else ""))
    t = time.time()
    mc = make_config(arch, None)
    if tiny:  # a smoke-test shape for a CPU (the vocabulary stays: the shards hold Tekken ids)
        mc.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16))
    write_random_checkpoint(mc, model)
    for f in (data / "tokenizer").iterdir():  # the checkpoint carries its tokenizer, as a hub model does
        shutil.copy2(f, model / f.name)
    print(f"checkpoint {model} ready in {time.time() - t:.0f} s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="d2a-scaling-"))
    shutil.copytree(data / "data", work / "data")
    log = work / "workers.log"
    results: dict[int, tuple[float, float, dict]] = {}
    for g in gpus:
        cfg = _config(work / "data", model, g, micro, steps, run_name=f"scale-{g}", liger=liger, extra=extra)
        run_dir, cmd, _ = prepare_run(cfg)
        ln = Launch(cmd, run_dir, log)
        ln.finish()
        recs = ln.new()
        tps, peak = throughput(recs, warmup)
        results[g] = (tps, peak, next(r for r in recs if r.get("event") == "startup"))
        print(f"{g} GPU(s): {tps:,.0f} tokens/s ({tps / g:,.0f} per GPU), peak {peak:.1f} GiB", flush=True)

    g = max(gpus)
    cfg = _config(work / "data", model, g, micro, 10**6, run_name=f"resume-{g}", liger=liger, extra=extra)
    run_dir, cmd, _ = prepare_run(cfg)
    launches = []
    for at in [*resume_at, None] if resume_at else []:
        ln = Launch(cmd, run_dir, log)
        ck = latest_checkpoint(run_dir)
        first = ln.wait_step(1)
        st = next(r for r in ln.new() if r.get("event") == "startup")
        launches.append({"resumed_from": ck.name if ck else "(fresh start)", "first_step_s": first["time"] - ln.t0,
                         "model_load_s": st["model_load_s"], "resume_s": st["resume_s"], "step": first["step"],
                         "to_loop_s": st["time"] - ln.t0, "step_s": first["time"] - st["time"]})
        if at is None:
            ln.preempt()
            break
        ln.wait_step(at)
        rc = ln.preempt()
        if rc != EXIT_PREEMPTED and rc != 1:  # accelerate launch reports a rank's 75 as 1
            raise RuntimeError(f"preempted launch exited {rc}")

    print(f"\nbench_scaling: {arch}, micro-batch {micro} x 2048 per GPU, grad_accum 1, liger {liger}, "
          f"{torch.cuda.get_device_name(0) if n_gpu else 'CPU'}" + (f", {extra}" if extra else ""))
    print(f"{'GPUs':>5}{'tokens/s':>12}{'per GPU':>10}{'scaling':>9}{'peak GiB':>10}{'model load s':>14}")
    base = results[min(gpus)][0] / min(gpus)
    for g2, (tps, peak, st) in results.items():
        print(f"{g2:>5}{tps:>12,.0f}{tps / g2:>10,.0f}{tps / base:>8.2f}x{peak:>10.1f}{st['model_load_s']:>14.1f}")
    if not launches:
        shutil.rmtree(work, ignore_errors=True)
        return
    print(f"\nresume on {g} GPU(s): launch -> first optimizer step done")
    print(f"{'resumed from':<16}{'first step':>11}{'launch->step s':>16}{'model load s':>14}{'resume s':>10}"
          f"{'loop starts s':>15}{'step s':>8}{'beyond load s':>15}")
    for r in launches:
        print(f"{r['resumed_from']:<16}{r['step']:>11}{r['first_step_s']:>16.1f}{r['model_load_s']:>14.1f}"
              f"{r['resume_s']:>10.2f}{r['to_loop_s']:>15.1f}{r['step_s']:>8.1f}{r['first_step_s'] - r['model_load_s']:>15.1f}")
    print("(loop starts: launch -> the training loop's first batch, i.e. launcher + imports + model load + resume; "
          "step: the first step itself)")
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=REPO / ".benchdata" / "scaling")
    p.add_argument("--demo-root", type=Path, default=REPO / "data" / "demo")
    r = sub.add_parser("run")
    r.add_argument("--data", type=Path, default=REPO / ".benchdata" / "scaling")
    r.add_argument("--arch", default="mistral-small-24b")
    r.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    r.add_argument("--micro-batch", type=int, default=4, help="rows of 2048 per GPU per step")
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--warmup", type=int, default=3, help="steps excluded from the throughput")
    r.add_argument("--liger", choices=["auto", "true", "false"], default="auto",
                   help="train.liger_kernel (auto: on with CUDA when installed)")
    r.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model of the same vocabulary (CPU smoke test)")
    r.add_argument("--ckpt-root", type=Path, default=Path("/tmp/d2a-bench"))
    r.add_argument("--resume-at", type=int, nargs="*", default=[3, 12],
                   help="preempt when these steps are done (each relaunch resumes from the newest checkpoint); "
                        "none: skip the resume measurement")
    r.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every launch, e.g. train.gradient_checkpointing=false")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.out, a.demo_root)
    else:
        run(a.data, a.arch, a.gpus, a.micro_batch, a.steps, a.warmup, a.liger, a.ckpt_root, a.resume_at, a.tiny,
            dict(kv.split("=", 1) for kv in a.set))


if __name__ == "__main__":
    main()
