"""The ``data-to-adapter`` flow: every stage, in order, tracked by Prefect.

Each stage is skipped when its inputs' fingerprints and its config are unchanged (see
tasks/manifest.py), so a scheduled re-run only redoes what changed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.prepare import prepare
from scrapers.testsite import demo_site_env
from tasks.config import load_config
from tasks.evaluate import evaluate
from tasks.extract import extract
from tasks.scrape import scrape
from tasks.train import train


@flow(name="data-to-adapter", log_prints=True)
def data_to_adapter(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Scrape -> extract -> clean+dedup -> split -> mix -> tokenize -> train QLoRA -> evaluate."""
    logger = get_run_logger()
    t0 = time.time()
    cfg = load_config(config, overrides or [])
    d = cfg.model_dump(mode="json")
    with demo_site_env(cfg):  # serves the bundled demo website on loopback when the config asks for it
        scraped = scrape(d)
    extracted = extract(d)
    prepared = prepare(config=config, overrides=overrides)
    cleaned, mixed, tok = prepared["clean"], prepared["mix"], prepared["tokenize"]
    trained = train(d)
    report = evaluate(d)
    summary = {
        "data_root": str(cfg.root),
        "documents": {"pages": scraped["counts"]["pages"], "extracted": extracted["counts"]["kept"],
                      "clean": cleaned["counts"]["kept"]},
        "train_tokens": tok["counts"]["train"]["tokens"],
        "mixture": {c: v["achieved_share"] for c, v in mixed["counts"]["categories"].items()},
        "run_dir": trained["run_dir"],
        "adapter": trained["adapter"],
        "eval_report": str(Path(trained["run_dir"]) / "eval.json"),
        "dashboards": report["dashboards"],
        "overall_loss": {"base": report["overall"]["base"]["loss"], "adapter": report["overall"]["adapter"]["loss"]},
        "sample": report["samples"][0],
        "wall_s": round(time.time() - t0, 1),
    }
    logger.info("done in %.0fs; adapter: %s", summary["wall_s"], summary["adapter"])
    return summary
