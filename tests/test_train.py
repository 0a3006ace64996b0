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


# The held-out losses of the reloaded adapter vs the ones the worker computed with the trained model in
# memory right after its last step (metrics.jsonl): the same NF4 weights, the same eval rows and code,
# so only float noise may differ (measured 0 on the tiny model). An adapter whose tensors did not load
# gives the base's losses, which differ by orders of magnitude more (the test checks that too).
EVAL_RTOL = 1e-5


def assert_reproduces_trained_model(run_dir, model_cfg=None) -> dict:
    """Load base + adapter fresh through the product's loader (tasks/adapter/generate.py) and check
    that every adapter tensor loaded as saved and the held-out losses per category equal the ones the
    worker measured with the trained model at its last step; returns {category: (base, trained, loaded)}."""
    from pathlib import Path

    from tasks.adapter.export import verify_loaded_adapter
    from tasks.adapter.generate import attach_adapter, load_run_base
    from tasks.core.config import load_config
    from tasks.train.heldout import eval_losses, load_eval_sets

    run = Path(run_dir)
    tc = load_config(run / "config.yaml").train
    steps = json.loads((run / "manifest.json").read_text())["counts"]["steps"]
    (final,) = [r for r in read_metrics(run) if "eval_loss" in r and r["step"] == steps]
    sets = load_eval_sets(Path(json.loads((run / "inputs.json").read_text())["tokenized_dir"]))
    base, _ = load_run_base(run)
    device = base.get_input_embeddings().weight.device
    kw = dict(max_rows=tc.eval_batches * tc.micro_batch_size, batch_size=tc.micro_batch_size, device=device)
    plain = eval_losses(base, sets, **kw)["categories"]  # before the adapter wraps the base's modules
    model = attach_adapter(base, run)
    verify_loaded_adapter(model, run / "adapter")
    loaded = eval_losses(model, sets, **kw)["categories"]
    out = {c: (plain[c]["loss"], final[f"eval_loss/{c}"], loaded[c]["loss"]) for c in loaded}
    print("held-out loss (base, trained in the worker, reloaded):", out)
    assert loaded.keys() == plain.keys() and {f"eval_loss/{c}" for c in loaded} <= final.keys()
    for c, (b, t, got) in out.items():
        assert got == pytest.approx(t, rel=EVAL_RTOL), (c, t, got)
        assert abs(b - t) > 100 * EVAL_RTOL * t, (c, b, t)  # a non-loaded adapter would be caught
    return out


def test_adapter_loads_and_reproduces_the_trained_model(trained, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tasks.adapter.export import verify_loaded_adapter

    cfg, m = trained
    cfg_json = json.loads(open(f"{m['adapter']}/adapter_config.json").read())
    assert set(cfg_json["target_modules"]) == {"q_proj", "k_proj", "v_proj"}
    assert cfg_json["r"] == 4
    assert_reproduces_trained_model(m["run_dir"])
    # plain PEFT on the unquantized base (how others load it): every tensor arrives
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    verify_loaded_adapter(PeftModel.from_pretrained(base, m["adapter"]), m["adapter"])
    # PEFT only warns about a file that lacks tensors; the check refuses it
    bad = tmp_path / "adapter"
    shutil.copytree(m["adapter"], bad)
    w = load_file(bad / "adapter_model.safetensors")
    save_file({k: v for k, v in w.items() if "layers.1.self_attn.v_proj.lora_B" not in k}, bad / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="missing adapter keys"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(bad))
    with pytest.raises(ValueError, match=r"1 tensor\(s\) the model expects are missing from the file.*v_proj"):
        verify_loaded_adapter(model, bad)


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
