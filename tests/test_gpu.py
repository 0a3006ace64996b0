"""GPU tests (run on a machine with two CUDA GPUs): ``pytest -m gpu tests/test_gpu.py``.

DDP and FSDP-QLoRA on 2 GPUs against 1 GPU with the doubled micro-batch: the same loss curve
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
from safetensors.torch import load_file

from conftest import REPO, read_metrics, tiny_config_dict
from tasks.config import config_from_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

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


@pytest.mark.parametrize("quant_storage", ["uint8", "bfloat16"])
def test_ddp_two_gpus_matches_one(data_root, small_model_dir, quant_storage):
    from tasks.train import run_train

    one = run_train(_cfg(data_root, small_model_dir, f"g1-{quant_storage}", quant_storage, micro_batch_size=4))
    two = run_train(_cfg(data_root, small_model_dir, f"ddp-{quant_storage}", quant_storage, micro_batch_size=2,
                         num_processes=2, accelerate_config="configs/accelerate/ddp.yaml"))
    assert two["counts"]["world_size"] == 2 and two["counts"]["skipped_steps"] == 0
    assert two["counts"]["tokens_seen"] == one["counts"]["tokens_seen"]
    _close(_losses(two["run_dir"]), _losses(one["run_dir"]))
    _adapters_close(two["run_dir"], one["run_dir"])


def test_fsdp_qlora_two_gpus_matches_one(data_root, small_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.train import run_train

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


def test_fsdp_refuses_uint8_storage(data_root, small_model_dir):
    from tasks.train import run_train

    with pytest.raises(ValueError, match="quant_storage equal to the compute dtype"):
        run_train(_cfg(data_root, small_model_dir, "fsdp-u8", "uint8", micro_batch_size=2, num_processes=2,
                       accelerate_config="configs/accelerate/fsdp.yaml"))


def test_ddp_preempted_then_resumed_matches_uninterrupted(data_root, small_model_dir, tmp_path):
    """SIGTERM to every process of a 2-GPU run: all ranks save at the same step boundary; the
    relaunch resumes and ends close to an uninterrupted run (deterministic kernels)."""
    from tasks.train import PREEMPTED_MARK, latest_checkpoint, prepare_run, run_train

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
