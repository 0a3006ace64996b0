"""The real training loop (NF4 base + LoRA + PagedAdamW8bit) on a tiny random Llama, on CPU."""

import json
import shutil

import pytest
import torch
from conftest import prepare_tokenized as _prepare
from conftest import read_metrics
from safetensors.torch import load_file

from tasks.core.config import QuantizationConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    from tasks.train.stage import run_train

    root = tmp_path_factory.mktemp("train")
    cfg = _prepare(root, tiny_model_dir, train={"epochs": 2})
    m = run_train(cfg)
    return cfg, m


def test_adapter_learns(trained):
    cfg, m = trained
    run = cfg.root / "runs" / m["run_dir"].split("/")[-1]
    w = load_file(run / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in w.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: it moved
    recs = read_metrics(run)
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == m["counts"]["steps"] >= 4
    assert losses[-1] < losses[0]
    assert any("eval_loss" in r for r in recs)
    assert (run / "adapter" / "quantization.json").is_file()
    assert m["counts"]["skipped_steps"] == 0


def test_adapter_loads_in_plain_peft(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, m = trained
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(base, m["adapter"])
    cfg_json = json.loads(open(f"{m['adapter']}/adapter_config.json").read())
    assert set(cfg_json["target_modules"]) == {"q_proj", "k_proj", "v_proj"}
    assert cfg_json["r"] == 4
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[3, 4, 5]]))
    assert torch.isfinite(out.logits).all()


def test_evaluate_and_generate(trained):
    from tasks.adapter.generate import run_generate
    from tasks.evaluate import run_evaluate

    cfg, m = trained
    rep = run_evaluate(cfg)
    assert set(rep["categories"]) == {"recipes", "code"}
    assert rep["overall"]["adapter"]["loss"] < rep["overall"]["base"]["loss"]
    for png in rep["dashboards"].values():
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert rep["samples"][0]["adapter"] is not None
    run = m["run_dir"]
    assert isinstance(run_generate(run, "Lentil soup?"), str)
    with pytest.raises(ValueError, match="quantization mismatch"):
        run_generate(run, "Lentil soup?", quantization=QuantizationConfig(compute_dtype="bfloat16"))


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path, tiny_model_dir):
    """Drop the end of a finished run, launch again: it resumes from the last verified checkpoint
    (O(1) data position, optimizer, schedule, RNG) and ends with a bit-identical adapter."""
    from tasks.train.checkpoint import latest_checkpoint
    from tasks.train.stage import run_train

    cfg = _prepare(tmp_path, tiny_model_dir, train={"max_steps": 4, "save_every": 2, "eval_every": 100})
    m = run_train(cfg)
    run = tmp_path / "runs" / m["run_dir"].split("/")[-1]
    full = load_file(run / "adapter" / "adapter_model.safetensors")
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    # simulate a crash after step 2's checkpoint: later state gone, and a torn checkpoint left behind
    shutil.rmtree(run / "checkpoints" / "step-4")
    shutil.rmtree(run / "adapter")
    (run / "manifest.json").unlink()
    (run / "metrics.jsonl").write_text("")
    torn = run / "checkpoints" / "step-3"
    shutil.copytree(run / "checkpoints" / "step-2", torn)
    (torn / "optimizer.pt").write_bytes(b"garbage")
    assert latest_checkpoint(run).name == "step-2"  # the corrupted one is skipped
    m2 = run_train(cfg)
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert m2["counts"]["steps"] == 4
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    again = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert again == losses[2:]


def test_init_adapter_continues_from_an_earlier_adapter(trained, tmp_path, tiny_model_dir):
    """train.init_adapter starts LoRA from a given adapter instead of zeros: with a learning rate too
    small to move anything, the new adapter equals the one it started from."""
    from tasks.train.stage import run_train

    _, m = trained
    cfg = _prepare(tmp_path, tiny_model_dir, train={"max_steps": 1, "lr": 1e-12, "warmup_steps": 0,
                                                    "init_adapter": m["adapter"], "eval_every": 100})
    m2 = run_train(cfg)
    before = load_file(f"{m['adapter']}/adapter_model.safetensors")
    after = load_file(f"{m2['adapter']}/adapter_model.safetensors")
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6)
