"""Per-category evaluation: base vs adapter on the same held-out rows.

Writes ``runs/<run_id>/eval.json`` (loss and perplexity per category and overall, for the base and
the adapter, plus sample generations) and the dashboards ``training.png`` and ``evaluation.png``.
The base is evaluated first, then the adapter is attached to the same quantized weights, so both
numbers come from identical base weights, batches and kernels.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tasks.core._prefect import task
from tasks.core.cli import clean_errors, stage_args
from tasks.core.config import CATEGORIES, PipelineConfig, config_from_dict
from tasks.core.manifest import fingerprint, library_versions, require_manifest, write_json_atomic
from tasks.train.heldout import eval_losses, load_eval_sets

log = logging.getLogger(__name__)


def run_evaluate(cfg: PipelineConfig, logger: logging.Logger | None = None) -> dict[str, Any]:
    import torch

    from tasks.adapter.generate import attach_adapter, chat, load_run_base
    from tasks.adapter.report import plot_evaluation, plot_training
    from tasks.train.stage import run_dir_for

    logger = logger or log
    run_dir = run_dir_for(cfg)
    train_m = require_manifest(run_dir, "train")
    ec = cfg.evaluate
    fp = fingerprint({"evaluate": cfg.section("evaluate"), "generate": cfg.section("generate"),
                      "train": train_m["fingerprint"]})
    out_path = run_dir / "eval.json"
    if out_path.is_file():
        prev = json.loads(out_path.read_text())
        if prev.get("fingerprint") == fp:
            logger.info("evaluate: up to date (%s)", out_path)
            return prev
    t0 = time.time()
    inputs = json.loads((run_dir / "inputs.json").read_text())
    eval_sets = load_eval_sets(Path(inputs["tokenized_dir"]))
    if not eval_sets:
        raise ValueError(f"no held-out shards under {inputs['tokenized_dir']}/eval: nothing to evaluate")
    # the base first, untouched (an adapter with bias="all" would alter biases even when disabled),
    # then the same quantized weights with the adapter attached
    from tasks.core.model import base_revision

    # the config's base must be the one the adapter was trained on (a changed GGUF / source.json is refused)
    model, tok = load_run_base(run_dir, cfg.model.quantization, revision=base_revision(cfg.model))
    device = next(model.parameters()).device
    base = eval_losses(model, eval_sets, ec.max_rows_per_category, ec.batch_size, device)
    base_answer = chat(model, tok, ec.prompt, cfg.generate, ec.max_new_tokens)
    model = attach_adapter(model, run_dir)
    adapted = eval_losses(model, eval_sets, ec.max_rows_per_category, ec.batch_size, device)
    table = {
        cat: {"base": base["categories"][cat], "adapter": adapted["categories"][cat],
              "delta_loss": adapted["categories"][cat]["loss"] - base["categories"][cat]["loss"]}
        for cat in adapted["categories"]
    }
    missing = [c for c in CATEGORIES if c not in table]
    adapter_answer = chat(model, tok, ec.prompt, cfg.generate, ec.max_new_tokens)
    report = {
        "fingerprint": fp,
        "run_dir": str(run_dir),
        "base_model": cfg.model.name,
        "base_revision": base_revision(cfg.model),
        "categories": table,
        "categories_without_heldout": missing,
        "overall": {"base": base["overall"], "adapter": adapted["overall"]},
        "samples": [{"prompt": ec.prompt, "base": base_answer, "adapter": adapter_answer}],
        "versions": library_versions(),
        "wall_s": round(time.time() - t0, 1),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    dash = run_dir / "dashboards"
    dash.mkdir(exist_ok=True)
    report["dashboards"] = {
        "training": str(plot_training(run_dir / "metrics.jsonl", dash / "training.png")),
        "evaluation": str(plot_evaluation(report, dash / "evaluation.png")),
    }
    write_json_atomic(out_path, report)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for cat, r in table.items():
        logger.info("evaluate: %-22s base %.4f -> adapter %.4f (%+.4f)", cat, r["base"]["loss"], r["adapter"]["loss"], r["delta_loss"])
    if missing:
        logger.warning("evaluate: no held-out rows for %s", ", ".join(missing))
    return report


@task(name="evaluate")
def evaluate(cfg_dict: dict) -> dict:
    from prefect.logging import get_run_logger

    return run_evaluate(config_from_dict(cfg_dict), get_run_logger())


@clean_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = stage_args("Evaluate base vs adapter per category on the held-out split.", argv, verify=False)
    r = run_evaluate(cfg)
    print(json.dumps({"overall": r["overall"], "dashboards": r["dashboards"]}, indent=2))


if __name__ == "__main__":
    main()
