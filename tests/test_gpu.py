"""GPU tests: ``pytest -m gpu tests/test_gpu.py``.

One GPU: the fast path (tasks/train/fastpath.py) against plain PEFT and transformers' mask path: varlen
attention equals each document run alone (no attention across document boundaries), the fused
LoRA function's loss and gradients equal PEFT's, activation offload changes nothing but memory,
and tasks/train/ with the fast defaults trains the curve the plain path trains.
Two GPUs: DDP and FSDP-QLoRA against 1 GPU with the doubled micro-batch: the same loss curve
within tolerance (bf16 compute, NF4 base). A preempted DDP run resumes and ends where an
uninterrupted one does. The model is a small random Llama (a few M parameters, made here), so no
download is needed; the NF4/LoRA/PagedAdamW8bit/accelerate code paths are the production ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, tiny_config_dict
from safetensors.torch import load_file

from tasks.core.config import config_from_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

TRAIN = {"max_steps": 6, "grad_accum": 2, "save_every": 3, "eval_every": 3, "warmup_steps": 1, "lr": 2e-3,
         "keep_checkpoints": 5, "gradient_checkpointing": True, "num_threads": None}
RTOL = 3e-2  # bf16 compute, different reduction orders, per-rank vs global token means


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory, tiny_model_dir):
    """A small Llama (hidden 256, 4 layers) on the conftest tokenizer: big enough that FSDP has
    several units to shard, small enough to train in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("small-llama")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, small_model_dir):
    from conftest import prepare_tokenized as _prepare

    root = tmp_path_factory.mktemp("gpu")
    _prepare(root, small_model_dir, tokenize={"seq_len": 64, "rows_per_shard": 16})
    return root


def _cfg(root, model_dir, name, quant_storage="uint8", **train):
    d = tiny_config_dict(root, model_dir, run_name=name, train={**TRAIN, **train},
                         tokenize={"seq_len": 64, "rows_per_shard": 16})
    d["model"]["quantization"] = {"compute_dtype": "bfloat16", "quant_storage": quant_storage}
    return config_from_dict(d)


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=RTOL), (s, a[s], b[s])


def _adapters_close(d1, d2, min_cos: float = 0.95) -> None:
    a = load_file(Path(d1) / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(d2) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        cos = torch.nn.functional.cosine_similarity(a[k].flatten().float(), b[k].flatten().float(), dim=0)
        assert cos > min_cos, (k, float(cos))


@two_gpus
@pytest.mark.parametrize("quant_storage", ["uint8", "bfloat16"])
def test_ddp_two_gpus_matches_one(data_root, small_model_dir, quant_storage):
    from tasks.train.stage import run_train

    one = run_train(_cfg(data_root, small_model_dir, f"g1-{quant_storage}", quant_storage, micro_batch_size=4))
    two = run_train(_cfg(data_root, small_model_dir, f"ddp-{quant_storage}", quant_storage, micro_batch_size=2,
                         num_processes=2, accelerate_config="configs/accelerate/ddp.yaml"))
    assert two["counts"]["world_size"] == 2 and two["counts"]["skipped_steps"] == 0
    assert two["counts"]["tokens_seen"] == one["counts"]["tokens_seen"]
    _close(_losses(two["run_dir"]), _losses(one["run_dir"]))
    _adapters_close(two["run_dir"], one["run_dir"])


@two_gpus
def test_fsdp_qlora_two_gpus_matches_one(data_root, small_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.train.stage import run_train

    one = run_train(_cfg(data_root, small_model_dir, "g1-bf16", "bfloat16", micro_batch_size=4))
    fsdp = run_train(_cfg(data_root, small_model_dir, "fsdp", "bfloat16", micro_batch_size=2, num_processes=2,
                          accelerate_config="configs/accelerate/fsdp.yaml"))
    assert fsdp["counts"]["world_size"] == 2 and fsdp["counts"]["skipped_steps"] == 0
    _close(_losses(fsdp["run_dir"]), _losses(one["run_dir"]))
    _adapters_close(fsdp["run_dir"], one["run_dir"], min_cos=0.9)
    ck = Path(fsdp["run_dir"]) / "checkpoints" / "step-6"
    assert {p.name for p in ck.glob("optimizer-rank*.pt")} == {"optimizer-rank0.pt", "optimizer-rank1.pt"}
    # the FSDP adapter is an ordinary PEFT adapter
    base = AutoModelForCausalLM.from_pretrained(str(small_model_dir), dtype=torch.bfloat16)
    PeftModel.from_pretrained(base, fsdp["adapter"])


@two_gpus
def test_fsdp_refuses_uint8_storage(data_root, small_model_dir):
    from tasks.train.stage import run_train

    with pytest.raises(ValueError, match="quant_storage equal to the compute dtype"):
        run_train(_cfg(data_root, small_model_dir, "fsdp-u8", "uint8", micro_batch_size=2, num_processes=2,
                       accelerate_config="configs/accelerate/fsdp.yaml"))


@two_gpus
def test_ddp_preempted_then_resumed_matches_uninterrupted(data_root, small_model_dir, tmp_path):
    """SIGTERM to every process of a 2-GPU run: all ranks save at the same step boundary; the
    relaunch resumes and ends close to an uninterrupted run (deterministic kernels)."""
    from tasks.train.checkpoint import latest_checkpoint
    from tasks.train.stage import prepare_run, run_train
    from tasks.train.supervisor import PREEMPTED_MARK

    kw = dict(micro_batch_size=2, num_processes=2, accelerate_config="configs/accelerate/ddp.yaml",
              deterministic=True, max_steps=10, save_every=100)
    ref = run_train(_cfg(data_root, small_model_dir, "ddp-ref", **kw))
    cfg = _cfg(data_root, small_model_dir, "ddp-pre", **kw)
    run_dir, cmd, _ = prepare_run(cfg)
    log = tmp_path / "w.log"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "D2A_STEP_SLEEP_S": "0.5",
                                     "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    t0 = time.time()
    while not any(s >= 3 for s in _losses(run_dir)):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() - t0 < 300, log.read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)
    stopped = json.loads((run_dir / PREEMPTED_MARK).read_text())["step"]
    assert latest_checkpoint(run_dir).name == f"step-{stopped}" and stopped < 10
    assert {p.name for p in latest_checkpoint(run_dir).glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    m = run_train(cfg)
    assert m["counts"]["steps"] == 10
    _close(_losses(run_dir), _losses(ref["run_dir"]))
    _adapters_close(run_dir, ref["run_dir"], min_cos=0.99)


# ---------------------------------------------------------------------------- fast path, 1 GPU
def _packed_position_ids(rows: int, seq: int, seed: int) -> torch.Tensor:
    """Documents of random length per row; the first row starts mid-document, the last ends in one."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.empty(rows, seq, dtype=torch.long)
    for r in range(rows):
        i, start = 0, (37 if r == 0 else 0)
        while i < seq:
            n = int(torch.randint(5, seq // 2, (1,), generator=g))
            n = min(n, seq - i)
            pos[r, i:i + n] = torch.arange(start, start + n)
            i, start = i + n, 0
    return pos


def test_varlen_attention_stays_inside_documents():
    from tasks.train import fastpath

    assert fastpath.varlen_kernel() is not None, "this torch has no torch.nn.attention.varlen"
    import inspect

    print("varlen_attn", inspect.signature(fastpath.varlen_kernel()))
    torch.manual_seed(0)
    b, hq, hkv, s, d = 3, 8, 2, 512, 128
    pos = _packed_position_ids(b, s, 1).cuda()
    q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    calls = []
    real = fastpath._varlen_call
    fastpath._varlen_call = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        out, _ = fastpath.varlen_attention_forward(None, q, k, v, None, scaling=d ** -0.5, position_ids=pos)
    finally:
        fastpath._varlen_call = real
    assert calls, "the varlen kernel was not used"
    grad = torch.randn_like(out)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad)
    # reference: every document alone through causal SDPA, in float32
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    starts = fastpath.doc_starts(pos)
    ref = torch.empty(b, s, hq, d, device="cuda")
    pieces = []
    for r in range(b):
        edges = torch.nonzero(starts[r]).flatten().tolist() + [s]
        for a, e in zip(edges[:-1], edges[1:]):
            o = torch.nn.functional.scaled_dot_product_attention(
                qf[r:r + 1, :, a:e], kf[r:r + 1, :, a:e].repeat_interleave(hq // hkv, 1),
                vf[r:r + 1, :, a:e].repeat_interleave(hq // hkv, 1), is_causal=True)
            pieces.append((r, a, e, o[0].transpose(0, 1)))
    assert sum(1 for _ in pieces) > b  # several documents per row
    ref = torch.stack([torch.cat([p[3] for p in pieces if p[0] == r]) for r in range(b)])
    rq, rk, rv = torch.autograd.grad(ref, (qf, kf, vf), grad.float())

    def rel(x, y):
        return float((x.float() - y).norm() / y.norm())

    assert rel(out, ref) < 1e-2
    assert rel(gq, rq) < 2e-2 and rel(gk, rk) < 2e-2 and rel(gv, rv) < 2e-2


def _small_peft(model_dir, attn, fast_lora, seed=0, recompute=False, offload=False, dropout=0.0, kernels=False):
    from peft import LoraConfig, get_peft_model

    from tasks.core.config import ModelConfig, QuantizationConfig
    from tasks.core.model import load_base
    from tasks.train import fastpath

    mc = ModelConfig(name=str(model_dir), quantization=QuantizationConfig(compute_dtype="bfloat16"))
    fp = fastpath.FastPath(attention=attn, liger=False, fast_lora=fast_lora, recompute=recompute,
                           recompute_layers=None, offload=offload, kernels=kernels)
    base = load_base(str(model_dir), mc, device_map={"": 0}, attn_implementation=fp.attn_implementation)
    off = fastpath.prepare_base(base, fp)
    if off is not None:
        off.min_bytes = 0  # the small model's layer inputs are far under the production threshold
    torch.manual_seed(seed)
    m = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                        target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in m.named_parameters():
        if "lora_B" in n:  # a random B: every LoRA gradient non-trivial
            p.data = (torch.randn(p.shape, generator=g) * 0.05).to(p.device, p.dtype)
    fastpath.prepare_peft(m, fp)
    return m, off


def _loss_and_grads(m, batch):
    m.train()
    loss = m(**batch, use_cache=False).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.requires_grad}


def _batch(small_model_dir, rows=4, seq=256, seed=3):
    ids = torch.randint(3, 250, (rows, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids.cuda(), "labels": ids.clone().cuda(), "position_ids": _packed_position_ids(rows, seq, seed).cuda()}


def _grads_close(a: dict, b: dict, min_cos=0.995, max_rel=5e-2):
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].norm() > 0, k
        cos = torch.nn.functional.cosine_similarity(a[k].flatten(), b[k].flatten(), dim=0)
        rel = (a[k] - b[k]).norm() / b[k].norm()
        assert cos > min_cos and rel < max_rel, (k, float(cos), float(rel))


@pytest.mark.parametrize("kernels", [False, True])
def test_fast_path_matches_plain_peft(small_model_dir, kernels):
    """varlen attention + the fused LoRA function (+ the Triton kernels) against transformers' SDPA
    mask path + PEFT's own LoRA forward, bf16 on NF4: the same loss and LoRA gradients on the same
    packed batch."""
    batch = _batch(small_model_dir)
    plain, _ = _small_peft(small_model_dir, "sdpa", fast_lora=False)
    l0, g0 = _loss_and_grads(plain, batch)
    del plain
    fast, _ = _small_peft(small_model_dir, "varlen", fast_lora=True, kernels=kernels)
    from tasks.train import fastpath

    calls, real = [], fastpath.cu_seqlens_from_position_ids
    fastpath.cu_seqlens_from_position_ids = lambda p: calls.append(1) or real(p)
    try:
        l1, g1 = _loss_and_grads(fast, batch)
    finally:
        fastpath.cu_seqlens_from_position_ids = real
    assert len(calls) == 1  # one host sync a forward, not one a layer
    assert l1 == pytest.approx(l0, rel=1e-2)
    _grads_close(g1, g0)
    # and the documents matter: without position ids (one sequence a row) the loss differs
    nopos = {k: v for k, v in batch.items() if k != "position_ids"}
    fast.zero_grad()
    assert abs(_loss_and_grads(fast, nopos)[0] - l1) > 1e-3


def test_offload_changes_nothing_but_memory(small_model_dir):
    batch = _batch(small_model_dir, seed=4)
    ref, _ = _small_peft(small_model_dir, "varlen", fast_lora=True, recompute=False)
    l0, g0 = _loss_and_grads(ref, batch)
    del ref
    m, off = _small_peft(small_model_dir, "varlen", fast_lora=True, recompute=True, offload=True, dropout=0.1)
    assert off is not None
    torch.manual_seed(7)
    l1, g1 = _loss_and_grads(m, batch)
    assert off.bytes_offloaded > 0 and len(off.entries) >= 4  # one input per decoder layer at least
    # dropout 0.1: the recomputed forward must draw the same masks, or the gradients would not
    # match the ones an identical forward-only pass implies; compare with the same seed, no offload
    m2, _ = _small_peft(small_model_dir, "varlen", fast_lora=True, recompute=False, dropout=0.1)
    torch.manual_seed(7)
    l2, g2 = _loss_and_grads(m2, batch)
    assert l1 == pytest.approx(l2, rel=1e-3)
    _grads_close(g1, g2, min_cos=0.999, max_rel=2e-2)
    assert l1 == pytest.approx(l0, rel=5e-2)  # dropout 0.1 vs none: same ballpark


def test_train_fast_defaults_match_plain_path(data_root, small_model_dir, caplog):
    """tasks/train/ end to end on one GPU: the defaults (varlen, liger, fused LoRA), the
    low-memory setting (+ activation offload) and the speed setting (no recompute) train the loss
    curve the plain path (SDPA mask, PEFT forward, no liger) trains."""
    import logging

    from tasks.train.stage import run_train

    plain = run_train(_cfg(data_root, small_model_dir, "plain", micro_batch_size=4, attention="sdpa",
                           liger_kernel=False, fast_lora=False))
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        fast = run_train(_cfg(data_root, small_model_dir, "fast", micro_batch_size=4))
    assert "fast path: attention=varlen, liger=True, fast_lora=True" in caplog.text
    low = run_train(_cfg(data_root, small_model_dir, "lowmem", micro_batch_size=4, activation_offload=True))
    speed = run_train(_cfg(data_root, small_model_dir, "speed", micro_batch_size=4, gradient_checkpointing=False))
    for m in (fast, low, speed):
        assert m["counts"]["skipped_steps"] == 0
        _close(_losses(m["run_dir"]), _losses(plain["run_dir"]))
        _adapters_close(m["run_dir"], plain["run_dir"], min_cos=0.95)
