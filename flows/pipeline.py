"""The ``data-to-adapter`` flow: every stage, in order, tracked by Prefect.

Each stage is skipped when its inputs' fingerprints and its config are unchanged (see
tasks/core/manifest.py), so a scheduled re-run only redoes what changed. Prefect's own result cache is
switched off for the stage tasks (``NO_CACHE``): the manifests are the cache, keyed by the
fingerprints, and they stay correct whatever else touched the data root (a ``d2a stage`` run, a
deleted directory, another flow); a Prefect cache entry would not know about any of that.

``force`` re-runs stages whatever their fingerprints say (their manifests are removed first).

The step helpers (``scrape_step`` ...) are shared with the stage flows and ``rescrape-and-retrain``
(flows/deployments.py, flows/rescrape.py): each runs one stage's task and publishes its artifacts.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput
from pydantic import Field

from flows import artifacts
from flows.guard import check_run_parameters, data_root_lock
from flows.pools import gpu_deployment_suffix, placement, publish_placement, run_stage_deployment
from flows.prepare import prepare, stage_options, task_runner
from scrapers.testsite import demo_site_env
from tasks.adapter.promote import lineage, record_corpus, run_promote
from tasks.core.config import PipelineConfig, config_from_dict, load_config
from tasks.evaluate import evaluate
from tasks.extract import extract
from tasks.scrape import scrape
from tasks.train.plan import plan_steps
from tasks.train.stage import train

log = logging.getLogger("flows.pipeline")

# --------------------------------------------------------------------------- parameter types
# Prefect builds each flow's parameter model (pydantic) from these annotations: the UI renders a
# typed form from its JSON schema, and the server refuses a run whose parameters do not validate.
ConfigPath = Annotated[str, Field(min_length=1, description="Pipeline YAML, relative to the repository root "
                                                            "(configs/demo.yaml, configs/mistral-small-24b.yaml).")]
Overrides = Annotated[list[str] | None, Field(description="section.key=value overrides, e.g. train.max_steps=20, "
                                                          "data_root=data/exp1.")]
StageName = Literal["all", "scrape", "extract", "prepare", "clean", "split", "mix", "tokenize", "train", "evaluate"]
Force = Annotated[list[StageName] | None, Field(description="Stages to re-run even if up to date ('all', or names; "
                                                            "'prepare' = clean, split, mix, tokenize).")]

DATA_STAGES = ("extract", "clean", "split", "mix", "tokenize")
ALL_STAGES = ("scrape", *DATA_STAGES, "train", "evaluate")
_DIRS = {"extract": "extracted", "clean": "clean", "split": "split", "mix": "mix"}


def nocache(t):
    """The stage task without Prefect's result cache: the manifests decide what is up to date."""
    return t.with_options(cache_policy=NO_CACHE)


# ------------------------------------------------------------------------------------- force
def expand_force(force: list[str] | str | bool | None) -> set[str]:
    if force is True or force == "all":
        return set(ALL_STAGES)
    if not force:
        return set()
    names = [force] if isinstance(force, str) else list(force)
    out: set[str] = set()
    for n in names:
        if n == "all":
            out |= set(ALL_STAGES)
        elif n == "prepare":
            out |= {"clean", "split", "mix", "tokenize"}
        elif n in ALL_STAGES:
            out.add(n)
        else:
            raise ValueError(f"force: unknown stage {n!r}; expected all, prepare or one of {', '.join(ALL_STAGES)}")
    return out


def invalidate(cfg: PipelineConfig, stages: set[str], logger: logging.Logger | None = None) -> list[str]:
    """Make the given stages run again: remove their manifests (the data stay until rebuilt).

    A forced ``train`` starts its run directory over (checkpoints, adapter, metrics), since a
    manifest-less run dir would otherwise resume from its last checkpoint; ``evaluate`` removes
    ``eval.json``. ``scrape`` always runs (conditional requests), so forcing it changes nothing.
    Returns what was removed."""
    logger = logger or log
    root = cfg.root
    removed: list[str] = []
    if "train" in stages or "evaluate" in stages:
        run_dir = _current_run_dir(cfg)  # before the tokenize manifest that names it goes
        if run_dir is not None and run_dir.is_dir():
            if "train" in stages:
                for name in ("manifest.json", "adapter", "checkpoints", "metrics.jsonl", "tensorboard", "eval.json",
                             "dashboards", "promotion.json"):
                    p = run_dir / name
                    if p.exists():
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
                        removed.append(str(p))
            elif (run_dir / "eval.json").is_file():
                (run_dir / "eval.json").unlink()
                removed.append(str(run_dir / "eval.json"))
    for s in stages & set(_DIRS):
        p = root / _DIRS[s] / "manifest.json"
        if p.is_file():
            p.unlink()
            removed.append(str(p))
    if "tokenize" in stages:
        for p in (root / "tokenized").glob("*/manifest.json"):
            p.unlink()
            removed.append(str(p))
    if "scrape" in stages:
        logger.info("force: scrape always runs (conditional requests); nothing to invalidate")
    if removed:
        logger.info("force %s: removed %s", sorted(stages), ", ".join(removed))
    return removed


def _current_run_dir(cfg: PipelineConfig) -> Path | None:
    from tasks.train.stage import run_dir_for

    try:
        return run_dir_for(cfg)
    except FileNotFoundError:  # not tokenized yet: no run for this config
        return None


# -------------------------------------------------------------------------------- stage status
def existing_outputs(cfg: PipelineConfig) -> dict[str, str]:
    """fingerprint -> created_at of every stage output under the data root (manifests and eval reports)."""
    root = cfg.root
    paths = [root / d / "manifest.json" for d in ("raw", *_DIRS.values())]
    paths += list((root / "tokenized").glob("*/manifest.json"))
    paths += list((root / "runs").glob("*/manifest.json")) + list((root / "runs").glob("*/eval.json"))
    out = {}
    for p in paths:
        try:
            m = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if m.get("fingerprint"):
            out[m["fingerprint"]] = m.get("created_at")
    return out


def status_of(before: dict[str, str], m: dict[str, Any]) -> dict[str, Any]:
    """'up to date' when the stage returned the very output that existed before it ran."""
    fp, created = m.get("fingerprint"), m.get("created_at")
    return {"status": "up to date (skipped)" if fp in before and before[fp] == created else "ran",
            "fingerprint": fp, "created_at": created}


# --------------------------------------------------------------------------------- the steps
def scrape_step(cfg: PipelineConfig, d: dict[str, Any]) -> dict[str, Any]:
    with demo_site_env(cfg.demo_site):  # serves the bundled demo website on loopback when the config asks for it
        m = nocache(scrape).with_options(**stage_options(cfg, "scrape"))(d)
    artifacts.publish_scrape(cfg, m)
    return m


def expected_steps(cfg: PipelineConfig, tok_m: dict[str, Any]) -> int | None:
    """The run's optimizer steps (for the progress artifact) from the step plan the worker follows
    (epochs, max_steps or max_tokens over every rank of every node); None when unknown."""
    tc = cfg.train
    rows = tok_m.get("counts", {}).get("train", {}).get("rows")
    if not rows:
        return tc.max_steps or None
    try:
        plan = plan_steps(tc, rows, tok_m.get("seq_len", cfg.tokenize.seq_len), tc.num_processes * tc.nnodes)
    except ValueError:  # too few rows for one step: the worker says so
        return None
    return plan["total_steps"]


def train_step(cfg: PipelineConfig, d: dict[str, Any], tok_m: dict[str, Any] | None = None) -> dict[str, Any]:
    from tasks.train.stage import run_dir_for

    run_dir = run_dir_for(cfg)
    with artifacts.training_progress(cfg, run_dir, expected_steps(cfg, tok_m or {})):
        # a preempted (exit 75) or crashed worker fails the task; the retry relaunches it and it resumes
        # from its newest verified checkpoint (timeouts.train). A cancelled flow run is not retried.
        m = nocache(train).with_options(**stage_options(cfg, "train"))(d)
    artifacts.publish_training(cfg, Path(m["run_dir"]), m)
    return m


def evaluate_step(cfg: PipelineConfig, d: dict[str, Any]) -> dict[str, Any]:
    report = nocache(evaluate).with_options(**stage_options(cfg, "evaluate"))(d)
    artifacts.publish_eval(cfg, report)
    run_dir = Path(report["run_dir"])
    artifacts.publish_lineage(cfg, lineage(cfg, run_dir))
    return report


def plan_step(cfg: PipelineConfig, logger: logging.Logger) -> dict[str, Any]:
    """`d2a plan` inside the flow: saved under the data root, published, and its warnings raised in
    the log before anything is trained (first before the scrape, then with the scrape's real counts)."""
    from flows.plan import plan_markdown, run_plan

    p = run_plan(cfg)
    t = p["training"]
    artifacts.publish_markdown(cfg, "plan", plan_markdown(p),
                               f"plan ({p['phase']}): {t.get('steps', '?')} steps, {t.get('tokens', '?')} tokens, "
                               f"{t.get('device_hours', '?')} device-hours, {len(p['warnings'])} warning(s)")
    logger.info("plan (%s): %s steps, %s training tokens, %s device-hours", p["phase"], t.get("steps", "?"),
                t.get("tokens", "?"), t.get("device_hours", "?"))
    for w in p["warnings"]:
        logger.warning("plan: %s", w)
    return p


class PromotionApproval(RunInput):
    """What a reviewer answers when the flow pauses before a promotion (Prefect UI: Resume)."""

    approve: bool = Field(default=False, description="Make this adapter the current one.")
    reviewer: str = Field(default="", description="Who decided.")
    comment: str = Field(default="", description="Why.")


def approval_step(cfg: PipelineConfig, logger: logging.Logger):
    """The gate's last word, as a callback for run_promote: pause the flow run with the comparison table
    as the form's description and wait; approve promotes, reject or no answer in time keeps the current."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    def approve(decision: dict[str, Any]) -> tuple[bool, str]:
        timeout = cfg.schedule.approval_timeout_s
        table = "\n".join(artifacts.promotion_markdown(decision).splitlines()[1:])  # without the verdict line
        form = PromotionApproval.with_initial_data(
            description=f"## Approve `{decision['run_id']}` as the current adapter?\n\nEvery automatic check "
                        f"passed. No answer within {timeout} s rejects.\n{table}")
        logger.info("promote: waiting up to %d s for approval of %s", timeout, decision["run_id"])
        try:
            answer = pause_flow_run(wait_for_input=form, timeout=timeout, key=f"approve-{decision['run_id']}")
        except FlowPauseTimeout:
            return False, f"rejected: no approval within {timeout} s (schedule.approval_timeout_s)"
        who = answer.reviewer or "a reviewer"
        why = f" ({answer.comment})" if answer.comment else ""
        return answer.approve, f"{'approved' if answer.approve else 'rejected'} by {who}{why}"

    return approve


def promote_step(cfg: PipelineConfig, run_dir: Path, logger: logging.Logger) -> dict[str, Any]:
    from tasks.adapter.promote import read_current

    record_corpus(run_dir, cfg.root)  # the pages this adapter was made from: the next re-scrape's baseline
    before = read_current(cfg.root)
    p = run_promote(cfg, Path(run_dir), logger, approval_step(cfg, logger) if cfg.schedule.approval else None)
    artifacts.publish_promotion(cfg, p)
    if p["promoted"] and (before or {}).get("run_id") != p["run_id"]:  # newly current, not a refresh
        from flows.notify import announce_promotion

        announce_promotion(cfg, p)
    return p


@flow(name="extract-stage")
def extract_on_dask(d: dict[str, Any]) -> dict[str, Any]:
    """extract as a task on the flow's DaskTaskRunner: from inside it the stage sends its page batches
    to the same cluster (tasks/extract.py), as the prepare stages do theirs."""
    cfg = config_from_dict(d)
    return nocache(extract).with_options(**stage_options(cfg, "extract")).submit(d).result()


def extract_step(cfg: PipelineConfig, d: dict[str, Any]) -> dict[str, Any]:
    runner = task_runner(cfg.dask)
    if runner is None:
        return nocache(extract).with_options(**stage_options(cfg, "extract"))(d)
    return extract_on_dask.with_options(task_runner=runner)(d)


def train_and_evaluate(cfg: PipelineConfig, config: str, overrides: list[str] | None, d: dict[str, Any],
                       tok_m: dict[str, Any], promote: bool, where: list[dict[str, Any]],
                       logger: logging.Logger) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Train, evaluate and (optionally) promote: here, or on the GPU pool when this flow run came from a
    work-pool deployment (pools.dispatch). Returns the train manifest, the eval report and the promotion.

    On the pool, ``stage-train`` and ``stage-evaluate`` (which also promotes) are subflow runs of this
    deployment's GPU-pool deployments; their results are read back from the run directory."""
    suffix = gpu_deployment_suffix(cfg)
    if suffix is None:
        where.append(placement("train"))
        trained = train_step(cfg, d, tok_m)
        where.append(placement("evaluate"))
        report = evaluate_step(cfg, d)
        promotion = promote_step(cfg, Path(trained["run_dir"]), logger) if promote else None
        return trained, report, promotion
    from tasks.core.manifest import require_manifest
    from tasks.train.stage import run_dir_for

    params: dict[str, Any] = {"config": config, "overrides": overrides}
    if d["train"].get("init_adapter"):  # rescrape's warm start: the GPU runs read it from current.json too
        params["continue_from_current"] = True
    run_stage_deployment("stage-train", suffix, params, logger)
    run_dir = run_dir_for(config_from_dict(d))
    trained = require_manifest(run_dir, "train")
    run_stage_deployment("stage-evaluate", suffix, {**params, "promote": promote}, logger)
    report = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    promotion = json.loads((run_dir / "promotion.json").read_text(encoding="utf-8")) if promote else None
    return trained, report, promotion


# ---------------------------------------------------------------------------------- the flow
@flow(name="data-to-adapter", log_prints=True)
def data_to_adapter(config: ConfigPath = "configs/demo.yaml", overrides: Overrides = None,
                    force: Force = None,
                    promote: Annotated[bool, Field(description="Mark the adapter current if it is not worse than "
                                                               "the current one (schedule.promote_tolerance).")] = True,
                    ) -> dict[str, Any]:
    """Scrape -> extract -> clean+dedup -> split -> mix -> tokenize -> train QLoRA -> evaluate (-> promote).

    Args:
        config: Pipeline YAML, relative to the repository root (configs/demo.yaml, configs/mistral-small-24b.yaml).
        overrides: section.key=value overrides of the allowed settings (server.allowed_overrides), e.g.
            train.max_steps=20.
        force: Stages to re-run even if their inputs and config are unchanged ('all'; 'prepare' = clean, split,
            mix, tokenize).
        promote: Mark the new adapter current unless it is worse than the current one in some category by more
            than schedule.promote_tolerance.
    """
    logger = get_run_logger()
    t0 = time.time()
    check_run_parameters(config, overrides)
    cfg = load_config(config, overrides or [])
    with data_root_lock(cfg):
        return _dag(cfg, config, overrides, force, promote, logger, t0)


def _dag(cfg: PipelineConfig, config: str, overrides: list[str] | None, force: list[str] | None, promote: bool,
         logger: logging.Logger, t0: float) -> dict[str, Any]:
    invalidate(cfg, expand_force(force), logger)
    before = existing_outputs(cfg)
    d = cfg.model_dump(mode="json")
    status: dict[str, dict[str, Any]] = {}
    plan_step(cfg, logger)  # what the run will cost, before it costs anything
    where = [placement("scrape")]
    scraped = scrape_step(cfg, d)
    status["scrape"] = status_of(before, scraped)
    plan = plan_step(cfg, logger)  # again with the real page counts; its warnings come before training
    where.append(placement("extract"))
    extracted = extract_step(cfg, d)
    status["extract"] = status_of(before, extracted)
    where.append(placement("prepare"))
    prepared = prepare(config=config, overrides=overrides)
    cleaned, mixed, tok = prepared["clean"], prepared["mix"], prepared["tokenize"]
    for k in ("clean", "split", "mix", "tokenize"):
        status[k] = status_of(before, prepared[k])
    artifacts.publish_mixture(cfg, mixed)
    trained, report, promotion = train_and_evaluate(cfg, config, overrides, d, tok, promote, where, logger)
    status["train"] = status_of(before, trained)
    status["evaluate"] = status_of(before, report)
    artifacts.publish_stages(cfg, status)
    publish_placement(cfg, where)
    for k, v in status.items():
        logger.info("stage %-9s %s", k, v["status"])
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
        "stages": {k: v["status"] for k, v in status.items()},
        "promoted": None if promotion is None else promotion["promoted"],
        "plan": {k: plan["training"].get(k) for k in ("steps", "tokens", "device_hours")} | {"warnings": plan["warnings"]},
        "wall_s": round(time.time() - t0, 1),
    }
    logger.info("done in %.0fs; adapter: %s", summary["wall_s"], summary["adapter"])
    return summary
