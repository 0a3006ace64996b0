"""The ``rescrape-and-retrain`` flow: what the schedule runs (``schedule.cron`` in the config).

1. Re-scrape incrementally: the crawler sends conditional requests (ETag / Last-Modified), so an
   unchanged site costs 304s, and ``raw/manifest.json`` counts new / changed / unchanged / gone.
2. Compare the corpus with the one the *current* adapter was trained on (tasks/adapter/promote.py). At or
   below ``schedule.change_threshold`` the flow stops here and says so: nothing is retrained.
3. Otherwise extract, prepare (every data stage skips what its fingerprint says is unchanged),
   train (from scratch, or from the current adapter's weights with ``schedule.continue_from_previous``),
   evaluate, and promote the new adapter only if no category's held-out loss is worse than the
   current adapter's (on the same rows) by more than ``schedule.promote_tolerance``; otherwise the
   old one stays current and the ``promotion`` artifact and the log say why.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from flows import artifacts
from flows.guard import DataRootBusy, check_run_parameters, data_root_lock
from flows.pipeline import ConfigPath, Overrides, extract_step, scrape_step, train_and_evaluate
from flows.pools import publish_placement
from flows.prepare import prepare
from tasks.adapter.promote import retrain_decision
from tasks.core.config import PipelineConfig, TrainConfig, config_from_dict, load_config


def warm_start(cfg: PipelineConfig, d: dict[str, Any], current: dict[str, Any] | None, logger) -> str:
    """Apply ``schedule.continue_from_previous``; returns how training starts."""
    if not cfg.schedule.continue_from_previous:
        return "from scratch (schedule.continue_from_previous is false)"
    if current is None:
        return "from scratch (no current adapter to continue from)"
    if "init_adapter" not in TrainConfig.model_fields:
        logger.warning("schedule.continue_from_previous: train.init_adapter is not supported by tasks/train/ yet; "
                       "training from scratch")
        return "from scratch (train.init_adapter not supported yet)"
    d["train"]["init_adapter"] = current["adapter"]  # part of the train section, so of the run's fingerprint
    return f"from the current adapter {current['run_id']}"


@flow(name="rescrape-and-retrain", log_prints=True)
def rescrape_and_retrain(
    config: ConfigPath = "configs/demo.yaml",
    overrides: Overrides = None,
    force_retrain: Annotated[bool, Field(description="Retrain even if the corpus changed less than "
                                                     "schedule.change_threshold.")] = False,
) -> dict[str, Any]:
    """Re-scrape; retrain, evaluate and maybe promote only when the corpus changed enough.

    Args:
        config: Pipeline YAML, relative to the repository root; its schedule section sets the threshold,
            the promotion tolerance and whether training continues from the current adapter.
        overrides: section.key=value overrides, e.g. schedule.change_threshold=0.1.
        force_retrain: Retrain even if the corpus changed less than schedule.change_threshold.
    """
    logger = get_run_logger()
    t0 = time.time()
    check_run_parameters(config, overrides)
    cfg = load_config(config, overrides or [])
    try:
        with data_root_lock(cfg):
            return _rescrape(cfg, config, overrides, force_retrain, logger, t0)
    except DataRootBusy as busy:
        # a weekly schedule must not overlap a multi-week training: skip this tick, say so, and succeed
        msg = f"rescrape-and-retrain skipped: {busy}"
        logger.warning(msg)
        artifacts.publish_markdown(cfg, "rescrape-decision", f"## Re-scrape skipped\n\n{msg}\n",
                                   "skipped: another run holds the data root")
        return {"data_root": str(cfg.root), "skipped": True, "reason": str(busy), "retrained": False,
                "promoted": False, "wall_s": round(time.time() - t0, 1)}


def _rescrape(cfg: PipelineConfig, config: str, overrides: list[str] | None, force_retrain: bool, logger,
              t0: float) -> dict[str, Any]:
    from flows.pools import placement

    where = [placement("scrape")]
    d = cfg.model_dump(mode="json")
    scraped = scrape_step(cfg, d)
    c = scraped["counts"]
    logger.info("re-scrape: %d pages; new %d, changed %d, unchanged %d, gone %d; %d fetched, %d not modified",
                c["pages"], c["new"], c["changed"], c["unchanged"], c["gone"], c["fetched"], c["not_modified"])
    decision = retrain_decision(cfg, force=force_retrain)
    out: dict[str, Any] = {"data_root": str(cfg.root), "scrape": {k: c[k] for k in ("pages", "new", "changed",
                                                                                    "unchanged", "gone", "fetched",
                                                                                    "not_modified")},
                           "drift": decision.drift.__dict__ if decision.drift else None,
                           "retrained": decision.retrain, "reason": decision.reason,
                           "current": decision.current and decision.current["run_id"]}
    artifacts.publish_markdown(cfg, "rescrape-decision",
                               f"## Re-scrape decision: {'retrain' if decision.retrain else 'no retraining'}\n\n"
                               f"{decision.reason}\n\nThreshold: {cfg.schedule.change_threshold:.1%} of pages "
                               f"(new + changed + gone) since the current adapter's corpus.",
                               "retrain" if decision.retrain else "kept current adapter: corpus changed too little")
    logger.info("rescrape: %s", decision.reason)
    if not decision.retrain:
        out["promoted"] = False
        out["wall_s"] = round(time.time() - t0, 1)
        return out
    start = warm_start(cfg, d, decision.current, logger)
    cfg = config_from_dict(d)
    logger.info("training %s", start)
    where += [placement("extract"), placement("prepare")]
    extract_step(cfg, d)
    prepared = prepare(config=config, overrides=overrides)
    artifacts.publish_mixture(cfg, prepared["mix"])
    trained, _, promotion = train_and_evaluate(cfg, config, overrides, d, prepared["tokenize"], True, where, logger)
    run_dir = Path(trained["run_dir"])
    publish_placement(cfg, where)
    out.update({"run_dir": str(run_dir), "training_start": start, "promoted": promotion["promoted"],
                "promotion_reasons": promotion["reasons"], "wall_s": round(time.time() - t0, 1)})
    return out
