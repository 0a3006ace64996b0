"""Export a trained adapter: merge it into a bf16 (de-quantized) copy of the base, verify the merge,
and write a self-describing model directory; check the adapter directory for PEFT/vLLM loading.

    python -m tasks.adapter.export --run data/demo/runs/<run_id>                 # -> <run>/merged/
    python -m tasks.adapter.export --run data/demo/runs/<run_id> --into-4bit     # -> <run>/merged-4bit/ (lossy, measured)
    python -m tasks.adapter.export --run data/demo/runs/<run_id> --vllm-adapter  # -> <run>/adapter-vllm/

The merge loads the base unquantized from the recorded ``base_path`` (float32: the bf16 weights
upcast exactly), attaches the adapter (``PeftModel.from_pretrained``) and computes reference logits
on a fixed set of prompts, then ``merge_and_unload`` folds W + (alpha/r)·B·A into the weights, which
are saved in bf16. The merge arithmetic is checked in memory, and the saved model is loaded back and
compared with the reference: the maximum absolute logit difference is printed, recorded in
``lineage.json`` and the model card, and the export fails above the stated tolerance.

Merging into the 4-bit base is offered only when asked for (``--into-4bit``): W + B·A is
re-quantized to NF4, which rounds the adapter's small update away in part. It warns, measures
the difference against the 4-bit base + adapter that training used, and records it as "not
verified" (no tolerance separates a correct re-quantized merge from a wrong one); what it does check
is that the saved 4-bit model reproduces the merged model it measured. Both paths refuse an adapter
that did not load as saved (PEFT only warns about missing tensors).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from tasks.core._prefect import task
from tasks.core.config import ConfigError, load_config
from tasks.core.manifest import fingerprint, library_versions, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

# Prompts the merge is verified on: the run's evaluation prompt plus these (the training domain,
# one without the chat template).
CHECK_PROMPTS = (
    "What is citric acid (E330) used for in food?",
    "List the ingredients of a simple oat drink.",
    "Write a Python function that computes kcal from protein, carbs and fat.",
)
RAW_CHECK_TEXT = "Red lentil soup: rinse the lentils, soften onion and carrot in olive oil, add cumin and"

# Stated tolerances, on max |logit(merged) - logit(base + adapter)| over the check inputs (float32):
# - the merge arithmetic (float32 merged weights, in memory): measured 1.1e-4 on SmolLM2-135M + the
#   demo's r=32 adapter; a wrong merge (missing scale, wrong module, lost bias) is of the order of
#   the adapter's effect (6.2 there), so 1e-2 separates the two by orders of magnitude.
# - the saved bf16 model: rounding W + BA to bf16 loses the part of BA below half a bf16 step of
#   W. Measured 0.22 on the demo adapter (logits up to ~40), i.e. 3.6% of the adapter's effect
#   (6.2); on the tiny test model 1.9e-3. Allowed: 10% of the effect (floor 0.01).
MERGE_TOLERANCE = 1e-2
BF16_REL_TOLERANCE = 0.10
BF16_FLOOR = 1e-2
# - the 4-bit merge itself has none (see merge_4bit): it is recorded as "not verified". What is
#   checked is that the saved 4-bit model, loaded back, gives the logits that were measured in memory:
#   the same NF4 bytes through the same kernels, so only summation-order noise is allowed (1e-4 of
#   logits of order 1-40; a lost or mis-saved weight moves them by far more).
SAVED_4BIT_TOLERANCE = 1e-4

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# -------------------------------------------------------------------------------- records
def run_records(run_dir: Path) -> dict[str, Any]:
    """What the run recorded: quantization/base, lineage, inputs, train manifest, eval (if any)."""
    run_dir = Path(run_dir)

    def _json(p: Path, required: bool = True) -> dict[str, Any] | None:
        if not p.is_file():
            if required:
                raise FileNotFoundError(f"{p} not found: is {run_dir} a finished training run?")
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None

    adapter = run_dir / "adapter"
    return {
        "quantization": _json(adapter / "quantization.json"),
        "lineage": _json(adapter / "lineage.json", required=False) or {},
        "inputs": _json(run_dir / "inputs.json"),
        "manifest": _json(run_dir / "manifest.json"),
        "eval": _json(run_dir / "eval.json", required=False),
    }


def data_snapshot(rec: dict[str, Any]) -> dict[str, Any]:
    """The data the adapter was trained on, by fingerprint: the tokenized shards (and, through
    their manifest, the mix/split/tokenizer fingerprints) and the training run's own fingerprint."""
    inputs = rec["inputs"]
    snap: dict[str, Any] = {
        "tokenized": inputs["stage_inputs"]["tokenized"],
        "tokenized_dir": inputs["tokenized_dir"],
        "train_fingerprint": rec["manifest"]["fingerprint"],
    }
    tok_manifest = Path(inputs["tokenized_dir"]) / "manifest.json"
    if tok_manifest.is_file():
        tm = json.loads(tok_manifest.read_text())
        snap["tokenized_inputs"] = tm.get("inputs", {})
        snap["tokenized_counts"] = {"train_tokens": tm.get("counts", {}).get("train", {}).get("tokens"),
                                    "seq_len": tm.get("seq_len")}
    return snap


# ------------------------------------------------------------------------ adapter layout
def check_adapter_layout(adapter_dir: Path) -> list[str]:
    """Problems that stop ``peft.PeftModel.from_pretrained`` or vLLM's LoRA loader (``--lora-modules
    name=path``) from using ``adapter_dir``; an empty list means it is ready for both."""
    from safetensors import safe_open

    d = Path(adapter_dir)
    problems: list[str] = []
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        return [f"{cfg_path}: missing"]
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return [f"{cfg_path}: not valid JSON ({e.msg}, line {e.lineno})"]
    if cfg.get("peft_type") != "LORA":
        problems.append(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), int) or cfg.get(key) < 1:
            problems.append(f"{cfg_path}: {key} must be a positive integer, got {cfg.get(key)!r}")
    tm = cfg.get("target_modules")
    if not tm or not isinstance(tm, (list, str)):
        problems.append(f"{cfg_path}: target_modules missing or empty")
    base_id = cfg.get("base_model_name_or_path")
    recorded = _recorded_base_name(d)
    if not base_id:
        problems.append(f"{cfg_path}: base_model_name_or_path missing")
    elif _looks_local(base_id) and recorded and base_id != recorded:
        problems.append(f"{cfg_path}: base_model_name_or_path is the local path {base_id!r}; it should be the "
                        f"base's id {recorded!r} (model.name), which other machines and vLLM can resolve")
    if cfg.get("bias", "none") != "none":
        problems.append(f"{cfg_path}: bias is {cfg['bias']!r}; vLLM refuses adapters with bias != 'none' "
                        "('Adapter bias is not supported')")
    if cfg.get("modules_to_save"):
        problems.append(f"{cfg_path}: modules_to_save={cfg['modules_to_save']!r}; vLLM supports only None")
    if cfg.get("use_dora"):
        problems.append(f"{cfg_path}: use_dora is true; vLLM does not support DoRA")
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        problems.append(f"{weights}: missing (the adapter weights must be safetensors)")
    else:
        try:
            with safe_open(str(weights), framework="pt") as st:
                keys = list(st.keys())
        except Exception as e:  # noqa: BLE001 - any read failure means the file is unusable
            problems.append(f"{weights}: not a readable safetensors file ({e})")
            keys = []
        other = [k for k in keys if not any(f".{s}." in k or k.endswith(f".{s}") for s in
                                            ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"))]
        if keys and not len(keys) - len(other):
            problems.append(f"{weights}: holds no lora_A/lora_B tensors")
        if other:
            problems.append(f"{weights}: {len(other)} tensor(s) besides LoRA A/B (e.g. {other[0]}), such as trained "
                            "base biases; vLLM cannot apply them (serve the merged model instead)")
    pickles = sorted(p.name for p in d.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        problems.append(f"{d}: pickle files {pickles}; ship safetensors only")
    return problems


def _looks_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or Path(name).exists()


def _recorded_base_name(adapter_dir: Path) -> str | None:
    for f in ("lineage.json", "quantization.json"):
        p = adapter_dir / f
        if p.is_file():
            name = json.loads(p.read_text()).get("base_model")
            if name:
                return name
    return None


def prepare_vllm_adapter(run_dir: Path, out_dir: Path | None = None) -> Path:
    """A copy of the run's adapter that vLLM loads: base_model_name_or_path set to the base's id and
    bias 'none'. The latter is exact only when no bias tensor was saved (Llama/Mistral projections
    have no biases, so bias='all' trained nothing); an adapter that did train biases is refused."""
    from safetensors import safe_open

    src = Path(run_dir) / "adapter"
    out = Path(out_dir) if out_dir else Path(run_dir) / "adapter-vllm"
    cfg = json.loads((src / "adapter_config.json").read_text())
    with safe_open(str(src / "adapter_model.safetensors"), framework="pt") as st:
        extra = [k for k in st.keys() if "lora_" not in k]
    if extra:
        raise ValueError(f"{src}/adapter_model.safetensors holds {len(extra)} non-LoRA tensor(s) (e.g. {extra[0]}), "
                         "trained base biases that vLLM cannot apply: serve the merged model (tasks.adapter.export) instead")
    name = _recorded_base_name(src) or cfg.get("base_model_name_or_path")
    cfg.update({"base_model_name_or_path": name, "bias": "none"})
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "adapter_config.json" and f.suffix.lower() not in PICKLE_SUFFIXES:
            shutil.copy2(f, tmp / f.name)
    write_json_atomic(tmp / "adapter_config.json", cfg)
    problems = check_adapter_layout(tmp)
    if problems:
        raise ValueError("the vLLM copy still has problems:\n  " + "\n  ".join(problems))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def verify_loaded_adapter(model, adapter_dir: Path) -> None:
    """Check that ``model`` (a PeftModel) holds exactly the adapter file's tensors. PEFT only warns
    when the file lacks tensors the model expects (those keep their init, LoRA B = 0: the adapter
    silently does nothing there) and drops tensors no module takes; both are refused here, naming the
    keys, as is any loaded tensor that differs from the file's."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    f = Path(adapter_dir) / "adapter_model.safetensors"
    saved = load_file(str(f))
    loaded = get_peft_model_state_dict(model)
    missing, unexpected = sorted(set(loaded) - set(saved)), sorted(set(saved) - set(loaded))
    differ = [k for k in sorted(set(loaded) & set(saved))
              if not torch.equal(loaded[k].detach().cpu(), saved[k].to(loaded[k].dtype))]
    problems = [f"{len(v)} {what} (e.g. {v[0]})" for v, what in (
        (missing, "tensor(s) the model expects are missing from the file; they stayed at their initial values"),
        (unexpected, "tensor(s) in the file match no module of the model and were ignored"),
        (differ, "loaded tensor(s) differ from the file's")) if v]
    if problems:
        raise ValueError(f"{f}: the adapter did not load as saved: " + "; ".join(problems))


# ------------------------------------------------------------------------------- logits
def check_inputs(tok, eval_prompt: str | None) -> tuple[list[str], list[dict[str, Any]]]:
    """The fixed verification inputs: chat-templated prompts plus one raw text."""
    from tasks.adapter.generate import encode_messages

    prompts = [p for p in ((eval_prompt,) if eval_prompt else ()) + CHECK_PROMPTS]
    encs = [encode_messages(tok, [{"role": "user", "content": p}]) for p in prompts]
    encs.append(dict(tok(RAW_CHECK_TEXT, return_tensors="pt")))
    return [*prompts, RAW_CHECK_TEXT], encs


def logits_on(model, encs: list[dict[str, Any]]) -> list[Any]:
    """Full logits (every position, every vocab entry) per input, as float32 on the CPU."""
    import torch

    device = model.get_input_embeddings().weight.device
    out = []
    with torch.no_grad():
        for e in encs:
            out.append(model(**{k: v.to(device) for k, v in e.items()}, use_cache=False).logits.float().cpu())
    return out


def compare_logits(ref: list[Any], got: list[Any]) -> dict[str, float]:
    import torch

    diffs = [(a - b).abs() for a, b in zip(ref, got)]
    agree = [(a.argmax(-1) == b.argmax(-1)).float().mean().item() for a, b in zip(ref, got)]
    return {
        "max_abs_diff": max(d.max().item() for d in diffs),
        "mean_abs_diff": float(torch.cat([d.flatten() for d in diffs]).mean()),
        "max_abs_logit": max(a.abs().max().item() for a in ref),
        "top1_agreement": sum(agree) / len(agree),
    }


def _free(*objs) -> None:
    import torch

    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------- merges
def merge_bf16(run_dir: Path, tmp: Path, rec: dict[str, Any], rel_tolerance: float,
               device_map: Any = None) -> dict[str, Any]:
    """Merge into the unquantized base, save bf16 safetensors to ``tmp``, verify twice:

    1. the merge itself: the merged weights (float32, in memory) vs base + adapter as LoRA layers;
       pure arithmetic, must agree to MERGE_TOLERANCE.
    2. what was saved: the bf16 model loaded back from disk vs base + adapter. Rounding W + BA to
       bf16 drops the part of the update below half a bf16 step of W, so this difference scales with
       how far the adapter moves the logits (its "effect", measured against the base): it must stay
       below ``rel_tolerance`` x effect (floor BF16_FLOOR).
    Both run in float32 (the bf16 base upcasts exactly), so no bf16 arithmetic noise is measured."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tasks.adapter.generate import check_adapter_fits, check_base_present
    from tasks.core.model import load_tokenizer

    cfg = load_config(Path(run_dir) / "config.yaml")
    base_path = rec["quantization"]["base_path"]
    check_base_present(base_path, Path(run_dir) / "adapter" / "quantization.json")
    adapter = Path(run_dir) / "adapter"
    tok = load_tokenizer(str(adapter), cfg.model)
    prompts, encs = check_inputs(tok, cfg.evaluate.prompt)
    kw: dict[str, Any] = dict(dtype=torch.float32, revision=cfg.model.revision,
                              trust_remote_code=cfg.model.trust_remote_code)
    if device_map is not None:
        kw["device_map"] = device_map
    base = AutoModelForCausalLM.from_pretrained(base_path, **kw).eval()
    check_adapter_fits(base, adapter)
    plain = logits_on(base, encs)  # before the adapter: a bias="all" adapter would alter the base
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    verify_loaded_adapter(model, adapter)
    ref = logits_on(model, encs)
    effect = compare_logits(plain, ref)["max_abs_diff"]
    merged = model.merge_and_unload()
    exact = compare_logits(ref, logits_on(merged, encs))
    merged.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _free(model, merged, base)
    # verify what was written, not what is in memory
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, **kw).eval()
    got = logits_on(reloaded, encs)
    _free(reloaded)
    stats = compare_logits(ref, got)
    tolerance = max(rel_tolerance * effect, BF16_FLOOR)
    passed = exact["max_abs_diff"] <= MERGE_TOLERANCE and stats["max_abs_diff"] <= tolerance
    return {"kind": "bf16", "saved_dtype": "bfloat16", "check_dtype": "float32",
            "reference": "unquantized base + adapter (PEFT LoRA layers)", "prompts": prompts,
            "adapter_effect_max_abs": effect,
            "merge_exact": {"max_abs_diff": exact["max_abs_diff"], "tolerance": MERGE_TOLERANCE},
            "rel_tolerance": rel_tolerance, "tolerance": tolerance, **stats,
            "status": "passed" if passed else "failed", "passed": passed}


def merge_4bit(run_dir: Path, tmp: Path) -> dict[str, Any]:
    """Merge into the 4-bit base as training loaded it. Lossy: measured, never silently offered.

    Measured on the fixed inputs, against the 4-bit base + adapter that training used: the merged
    model's logits (max and mean |difference|), and, for scale, how far the adapter moves the logits
    from the 4-bit base (its effect) and how far the merged model is from the base. No tolerance
    applies to the re-quantization: NF4 rounds each weight by up to half a quantization step (about
    absmax/16 of its block), far more than the adapter's per-weight update (B·A is ~1e-3 of W), and
    a changed block absmax re-rounds the whole block, so a correct merge may keep little of the
    adapter or drift past it; no threshold separates a correct merge from a wrong one. It is recorded
    as "not verified", with the numbers, and ``passed`` is None (never a pass nobody checked).

    What is checked, with a tolerance: the saved 4-bit model, loaded back from disk, reproduces the
    merged model that was measured (the same NF4 bytes through the same kernels: SAVED_4BIT_TOLERANCE)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.adapter.generate import attach_adapter, load_run_base
    from tasks.core.model import disable_cpu_inference_repack

    cfg = load_config(Path(run_dir) / "config.yaml")
    msg = ("merging into the 4-bit base re-quantizes W + BA to NF4: the rounding (up to half a quantization "
           "step per weight) removes part of the adapter's update; measuring it against the 4-bit base + adapter "
           "(not verified: no tolerance applies)")
    warnings.warn(msg, stacklevel=2)
    log.warning(msg)
    model, tok = load_run_base(run_dir)
    prompts, encs = check_inputs(tok, cfg.evaluate.prompt)
    plain = logits_on(model, encs)  # the 4-bit base alone, before the adapter wraps (and shares) its modules
    model = attach_adapter(model, run_dir)
    verify_loaded_adapter(model, Path(run_dir) / "adapter")
    ref = logits_on(model, encs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Merge lora module to 4-bit linear")
        merged = model.merge_and_unload()
    disable_cpu_inference_repack(merged)
    got = logits_on(merged, encs)
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _free(model, merged)
    # verify what was written: loaded back as a user would (its quantization config is in config.json)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, cfg.model.quantization.compute_dtype))
    disable_cpu_inference_repack(reloaded)
    saved = compare_logits(got, logits_on(reloaded.eval(), encs))
    _free(reloaded)
    stats = compare_logits(ref, got)
    effect = compare_logits(plain, ref)
    from_base = compare_logits(plain, got)
    return {"kind": "4bit", "saved_dtype": f"4-bit {rec_quant_type(run_dir)}",
            "check_dtype": cfg.model.quantization.compute_dtype,
            "reference": "4-bit base + adapter (as trained and served by tasks.adapter.generate)",
            "prompts": prompts, "tolerance": None, **stats,
            "status": "not verified", "passed": None,
            "why_not_verified": "re-quantizing W + BA to NF4 rounds each weight by up to half a quantization step, "
                                "more than the adapter's update: no tolerance separates a correct merge from a wrong one",
            "adapter_effect_max_abs": effect["max_abs_diff"], "adapter_effect_mean_abs": effect["mean_abs_diff"],
            "merged_vs_base_max_abs": from_base["max_abs_diff"], "merged_vs_base_mean_abs": from_base["mean_abs_diff"],
            "saved_reload": {"max_abs_diff": saved["max_abs_diff"], "tolerance": SAVED_4BIT_TOLERANCE,
                             "passed": saved["max_abs_diff"] <= SAVED_4BIT_TOLERANCE},
            "warning": msg}


def rec_quant_type(run_dir: Path) -> str:
    return json.loads((Path(run_dir) / "adapter" / "quantization.json").read_text())["quantization"]["quant_type"]


# ---------------------------------------------------------------------------- model card
def model_card(run_dir: Path, rec: dict[str, Any], snap: dict[str, Any], check: dict[str, Any]) -> str:
    import yaml

    cfg = load_config(Path(run_dir) / "config.yaml")
    q = rec["quantization"]
    base = q["base_model"]
    ev = rec["eval"]
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "tags: [lora, qlora, merged, data-to-adapter]",
        "---",
        "",
        f"# {cfg.run_name}: {base} + LoRA adapter, merged",
        "",
        f"The LoRA adapter of run `{Path(run_dir).name}` merged into "
        + ("a bf16 (de-quantized) copy of the base." if check["kind"] == "bf16" else
           "the 4-bit base (**lossy**: W + BA was re-quantized; see the verification below)."),
        "",
        "## Base",
        f"- model: `{base}` (loaded from `{q['base_path']}`)",
        f"- revision: `{q.get('base_revision') or 'not recorded'}` (the exact base weights the adapter was trained on)",
        f"- trained on the base quantized as: `{json.dumps(q['quantization'])}`",
        "",
        "## Data snapshot",
        f"- tokenized shards: `{snap['tokenized']}` (`{snap['tokenized_dir']}`)",
        *(f"- {k}: `{v}`" for k, v in snap.get("tokenized_inputs", {}).items()),
        f"- training run fingerprint: `{snap['train_fingerprint']}`",
        "",
        "## Training config",
        "```yaml",
        yaml.safe_dump({k: cfg.section(k) for k in ("lora", "train")}, sort_keys=False).rstrip(),
        "```",
        f"Steps {rec['manifest']['counts'].get('steps')}, tokens seen {rec['manifest']['counts'].get('tokens_seen')}, "
        f"final training loss {rec['manifest']['counts'].get('final_loss', float('nan')):.4f}.",
        "",
        "## Evaluation (held-out loss, base vs adapter)",
    ]
    if ev:
        lines += ["| category | base loss | adapter loss | delta |", "|---|---|---|---|"]
        for cat, r in ev.get("categories", {}).items():
            lines.append(f"| {cat} | {r['base']['loss']:.4f} | {r['adapter']['loss']:.4f} | {r['delta_loss']:+.4f} |")
        ov = ev.get("overall", {})
        if ov:
            lines.append(f"| **overall** | {ov['base']['loss']:.4f} | {ov['adapter']['loss']:.4f} | "
                         f"{ov['adapter']['loss'] - ov['base']['loss']:+.4f} |")
    else:
        lines.append("No `eval.json` in the run (the evaluate stage has not run).")
    if check["kind"] == "bf16":
        verdict = [f"- **{check['status']}**: max |difference| **{check['max_abs_diff']:.4g}** (tolerance "
                   f"{check['tolerance']:.4g}; largest logit {check['max_abs_logit']:.3g}; the adapter moves logits by "
                   f"up to {check['adapter_effect_max_abs']:.3g}; merge arithmetic in float32 "
                   f"{check['merge_exact']['max_abs_diff']:.2g})"]
    else:
        sr = check["saved_reload"]
        verdict = [f"- **not verified**: max |difference| **{check['max_abs_diff']:.4g}** (no tolerance applies: "
                   f"{check['why_not_verified']}; largest logit {check['max_abs_logit']:.3g})",
                   f"- for scale: the adapter moves the 4-bit base's logits by up to {check['adapter_effect_max_abs']:.3g} "
                   f"(mean {check['adapter_effect_mean_abs']:.3g}); this model differs from the 4-bit base by up to "
                   f"{check['merged_vs_base_max_abs']:.3g} (mean {check['merged_vs_base_mean_abs']:.3g})",
                   f"- checked: the saved files reproduce the merged model measured in memory (max |difference| "
                   f"{sr['max_abs_diff']:.2g}, tolerance {sr['tolerance']:.2g})"]
    lines += [
        "",
        "## Merge verification",
        f"Logits of this model vs {check['reference']}, on {len(check['prompts'])} fixed inputs, in {check['check_dtype']}:",
        *verdict,
        f"- mean |difference|: {check['mean_abs_diff']:.3g}; top-1 token agreement {check['top1_agreement']:.2%}",
        "",
        "## Lineage",
        f"`lineage.json` records the run directory (`{run_dir}`), the data snapshot and the base.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- export
def run_export(run_dir: Path, out_dir: Path | None = None, into_4bit: bool = False,
               rel_tolerance: float = BF16_REL_TOLERANCE, device_map: Any = None,
               logger: logging.Logger | None = None) -> dict[str, Any]:
    """Merge, verify, and write ``out_dir`` (default ``<run>/merged`` or ``<run>/merged-4bit``):
    safetensors + tokenizer + README.md (model card) + lineage.json + manifest.json. Built in
    ``<out>.partial`` and renamed when complete; a failed verification leaves only the .partial."""
    logger = logger or log
    run_dir = Path(run_dir)
    rec = run_records(run_dir)
    out = Path(out_dir) if out_dir else run_dir / ("merged-4bit" if into_4bit else "merged")
    adapter_sha = sha256_file(run_dir / "adapter" / "adapter_model.safetensors")
    fp = fingerprint({"adapter": adapter_sha, "base": rec["quantization"]["base_path"], "into_4bit": into_4bit,
                      "rel_tolerance": rel_tolerance})
    prev = out / "manifest.json"
    if prev.is_file() and json.loads(prev.read_text()).get("fingerprint") == fp:
        logger.info("export: up to date (%s)", out)
        return json.loads(prev.read_text())
    t0 = time.time()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    check = merge_4bit(run_dir, tmp) if into_4bit else merge_bf16(run_dir, tmp, rec, rel_tolerance, device_map)
    logger.info("export: merged vs base+adapter: max |logit diff| %.4g, mean %.3g (%s), top-1 agreement %.2f%%",
                check["max_abs_diff"], check["mean_abs_diff"],
                f"tolerance {check['tolerance']:.4g}: {check['status']}" if check["tolerance"] is not None
                else "not verified: no tolerance applies", 100 * check["top1_agreement"])
    if check["kind"] == "4bit" and not check["saved_reload"]["passed"]:
        sr = check["saved_reload"]
        raise ValueError(f"merge verification failed: the saved 4-bit model, loaded back, differs from the merged model "
                         f"by {sr['max_abs_diff']:.4g} in max |logit| (tolerance {sr['tolerance']:.2g}); the model is left in {tmp}")
    if check["kind"] == "bf16" and not check["passed"]:
        ex = check["merge_exact"]
        raise ValueError(f"merge verification failed: max |logit diff| {check['max_abs_diff']:.4g} (tolerance "
                         f"{check['tolerance']:.4g} = {rel_tolerance} x the adapter's effect "
                         f"{check['adapter_effect_max_abs']:.4g}); merge arithmetic {ex['max_abs_diff']:.3g} (tolerance "
                         f"{ex['tolerance']}), vs {check['reference']}; the unverified model is left in {tmp}")
    snap = data_snapshot(rec)
    lineage = {
        "run_dir": str(run_dir), "run_id": run_dir.name,
        "adapter": {"path": str(run_dir / "adapter"), "sha256": adapter_sha, "lineage": rec["lineage"]},
        "data": snap,
        "base": {"name": rec["quantization"]["base_model"], "path": rec["quantization"]["base_path"],
                 "quantization_trained_with": rec["quantization"]["quantization"]},
        "merge": check,
        "eval_overall": (rec["eval"] or {}).get("overall"),
        "versions": library_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(tmp / "lineage.json", lineage)
    (tmp / "README.md").write_text(model_card(run_dir, rec, snap, check), encoding="utf-8")
    files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"stage": "export", "fingerprint": fp, "config": {"into_4bit": into_4bit, "rel_tolerance": rel_tolerance,
                                                                  "tolerance": check["tolerance"]},
                "inputs": {"adapter": adapter_sha, "train": snap["train_fingerprint"]},
                "counts": {"max_abs_diff": check["max_abs_diff"], "mean_abs_diff": check["mean_abs_diff"],
                           "top1_agreement": check["top1_agreement"], "verification": check["status"],
                           "wall_s": round(time.time() - t0, 1)},
                "out_dir": str(out), "files": files, "versions": lineage["versions"],
                "created_at": lineage["created_at"]}
    write_json_atomic(tmp / "manifest.json", manifest)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    logger.info("export: wrote %s", out)
    return manifest


@task(name="export")
def export(run_dir: str, out_dir: str | None = None, into_4bit: bool = False) -> dict:
    from prefect.logging import get_run_logger

    return run_export(Path(run_dir), Path(out_dir) if out_dir else None, into_4bit, logger=get_run_logger())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tasks.adapter.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="runs/<run_id> directory of a finished run")
    ap.add_argument("--out", type=Path, help="default <run>/merged (or <run>/merged-4bit)")
    ap.add_argument("--into-4bit", action="store_true",
                    help="merge into the 4-bit base instead (lossy: re-quantizes W+BA; the loss is measured)")
    ap.add_argument("--rel-tolerance", type=float, default=BF16_REL_TOLERANCE,
                    help="bf16 merge: max |logit diff| allowed, as a fraction of the adapter's effect on the logits")
    ap.add_argument("--vllm-adapter", action="store_true",
                    help="only write <run>/adapter-vllm (base id, bias none) and check its layout; no merge")
    a = ap.parse_args(argv)
    # not force=True: an embedding caller's (or pytest's) handlers stay in place
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tasks.adapter.generate import pick_device_map
    from tasks.core.model import quiet_libraries

    quiet_libraries()
    try:
        if a.vllm_adapter:
            for p in check_adapter_layout(a.run / "adapter"):
                print(f"adapter as trained: {p}", file=sys.stderr)
            print(f"vLLM-ready adapter: {prepare_vllm_adapter(a.run, a.out)}")
            return
        m = run_export(a.run, a.out, a.into_4bit, a.rel_tolerance, pick_device_map())
    except (ValueError, FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    c = m["counts"]
    verdict = (f"tolerance {m['config']['tolerance']:.4g}: {c['verification']}" if m["config"]["tolerance"] is not None
               else "not verified: no tolerance applies to a re-quantized 4-bit merge, measured only")
    print(f"merged model: {m['out_dir']}\nmax |logit diff| vs base+adapter: {c['max_abs_diff']:.4g}, mean "
          f"{c['mean_abs_diff']:.3g} ({verdict}); top-1 agreement {c['top1_agreement']:.2%}")


if __name__ == "__main__":
    main()
