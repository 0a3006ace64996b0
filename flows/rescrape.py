"""The ``rescrape-and-retrain`` flow: what the schedule runs (``schedule.cron`` in the config).

1. Re-scrape incrementally: the crawler sends conditional requests (ETag / Last-Modified), so an
   unchanged site costs 304s, and ``raw/manifest.json`` counts new / changed / unchanged / gone.
2. Compare the corpus with the one the *current* adapter was trained on (tasks/adapter/promote.py). At or
   below ``schedule.change_threshold`` the flow stops here and says so: nothing is retrained.
   The comparison fails closed (``fail_closed``): a category that only one side has (a source that
   vanished or appeared, a scrape that lost a host) and the pages of a host whose robots.txt was
   unreachable are logged and left out, never counted as gone and never a reason to retrain.
3. Otherwise extract, prepare (every data stage skips what its fingerprint says is unchanged),
   train (from scratch, or from the current adapter's weights with ``schedule.continue_from_previous``),
   evaluate, and promote the new adapter only if no category's held-out loss is worse than the
   current adapter's (on the same rows) by more than ``schedule.promote_tolerance``; otherwise the
   old one stays current and the ``promotion`` artifact and the log say why.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from flows import artifacts
from flows.guard import DataRootBusy, check_run_parameters, data_root_lock
from flows.pipeline import ConfigPath, Overrides, extract_step, scrape_step, train_and_evaluate
from flows.pools import publish_placement
from flows.prepare import prepare
from tasks.adapter.promote import RetrainDecision, corpus_drift, corpus_snapshot, retrain_decision, revision_of
from tasks.core.config import PipelineConfig, config_from_dict, load_config
from tasks.core.manifest import read_manifest

log = logging.getLogger("flows.rescrape")


def _source_categories(cfg: PipelineConfig) -> tuple[dict[str, str], dict[str, set[str]]]:
    """source id -> category, and source id -> hosts, from the sources file and the published raw/."""
    from urllib.parse import urlsplit

    import pyarrow.parquet as pq

    from tasks.core.config import load_sources

    cats: dict[str, str] = {}
    hosts: dict[str, set[str]] = {}
    try:
        for s in load_sources(cfg.scrape.sources):
            cats[s.id] = s.category
            hosts[s.id] = {urlsplit(u).netloc.lower() for u in s.start_urls + s.sitemaps}
    except Exception as e:  # noqa: BLE001 - e.g. $DEMO_SITE unset outside a run: raw/ below still says it
        log.info("sources file not read for the drift check (%s); using raw/", e)
    for f in sorted((cfg.root / "raw").glob("*/pages.parquet")):
        t = pq.read_table(f, columns=["source_id", "category", "url"])
        for sid, cat, url in zip(*(t.column(c).to_pylist() for c in ("source_id", "category", "url"))):
            cats.setdefault(sid, cat)
            hosts.setdefault(sid, set()).add(urlsplit(url).netloc.lower())
    db = cfg.root / "scrape_state" / "state.sqlite"  # remembers sources that are in neither of the above now
    if db.is_file():
        import sqlite3

        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            for sid, cat in con.execute("SELECT DISTINCT source_id, category FROM url WHERE kind='page'"):
                if sid and cat:
                    cats.setdefault(sid, cat)
        except sqlite3.Error as e:
            log.info("crawl state not read for the drift check: %s", e)
        finally:
            con.close()
    return cats, hosts


def fail_closed(cfg: PipelineConfig, decision: RetrainDecision, force: bool = False) -> RetrainDecision:
    """The retrain decision with one-sided categories and unreachable hosts left out of the drift.

    A category present in only one of the two corpora says more about the scrape (a source that
    failed, a host whose robots.txt was down) than about the web; counting all its pages as gone
    (or new) would retrain on a broken scrape. Such categories and the earlier pages of hosts whose
    robots.txt was unreachable are logged and excluded; the rest of the corpus decides.
    """
    if decision.current is None or decision.drift is None or force:
        return decision
    base_file = Path(decision.current["run_dir"]) / "corpus.json"
    if not base_file.is_file():
        return decision
    old: dict[str, str] = json.loads(base_file.read_text())["pages"]
    new = corpus_snapshot(cfg.root)
    cats, hosts = _source_categories(cfg)

    def category(key: str) -> str:
        sid = key.split(":", 1)[0]
        return cats.get(sid, f"(source {sid})")

    old_cats, new_cats = {category(k) for k in old}, {category(k) for k in new}
    notes = [f"category {c!r} is only in the {'baseline' if c in old_cats else 'new'} corpus "
             f"({sum(category(k) == c for k in (old if c in old_cats else new))} pages): not counted "
             "(fail closed; force_retrain to retrain anyway)" for c in sorted(old_cats ^ new_cats)]
    raw = read_manifest(cfg.root / "raw") or {}
    unreachable = {o.split("://", 1)[-1].lower() for o in raw.get("robots_unreachable") or {}}
    down = {sid for sid, hs in hosts.items() if hs & unreachable}
    if unreachable:
        notes.append(f"robots.txt unreachable on {', '.join(sorted(unreachable))}: their pages kept as stale, "
                     f"and any missing one of source(s) {', '.join(sorted(down)) or '-'} not counted as gone")
    if not notes:
        return decision
    for n in notes:
        log.warning("drift check: %s", n)
    one_sided = old_cats ^ new_cats
    old = {k: v for k, v in old.items() if category(k) not in one_sided
           and not (k.split(":", 1)[0] in down and k not in new)}
    new = {k: v for k, v in new.items() if category(k) not in one_sided}
    drift = corpus_drift(old, new, decision.drift.baseline)
    threshold = cfg.schedule.change_threshold
    retrain = drift.fraction > threshold
    verdict = (f"> threshold {threshold:.1%}: retraining" if retrain else
               f"<= threshold {threshold:.1%}: kept adapter {decision.current['run_id']}, nothing retrained")
    return replace(decision, retrain=retrain, drift=drift,
                   reason=f"{drift.summary()} {verdict}; left out: {'; '.join(notes)}")


def warm_start(cfg: PipelineConfig, d: dict[str, Any], current: dict[str, Any] | None) -> str:
    """Apply ``schedule.continue_from_previous``; returns how training starts."""
    if not cfg.schedule.continue_from_previous:
        return "from scratch (schedule.continue_from_previous is false)"
    if current is None:
        return "from scratch (no current adapter to continue from)"
    from tasks.core.model import base_revision

    # a new base revision was pinned on purpose: the current adapter's deltas belong to the old weights
    made_on, now = revision_of(Path(current["run_dir"])), base_revision(cfg.model)
    if made_on is not None and made_on != now:
        return (f"from scratch (the current adapter {current['run_id']} was trained on base revision {made_on}, "
                f"the config's base is {now}; promote the new run by hand)")
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
    decision = fail_closed(cfg, retrain_decision(cfg, force=force_retrain), force=force_retrain)
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
    start = warm_start(cfg, d, decision.current)
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
