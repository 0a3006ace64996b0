"""The project's deployments: what ``make server`` / ``d2a server`` serves to the Prefect UI.

For each pipeline config (deployment name = the config's file stem, e.g. ``demo``):

  data-to-adapter/<name>        the whole DAG (config, overrides, force, promote)
  stage-scrape/<name>           scrape + extract
  stage-prepare/<name>          clean, split, mix, tokenize, on ``extracted/``
  stage-train/<name>            QLoRA training on ``tokenized/`` (supervised subprocess)
  stage-evaluate/<name>         base vs adapter per category on the held-out rows (+ optional promotion)
  generate/<name>               answer a prompt with the current (or a given) adapter
  rescrape-and-retrain/<name>   scheduled: ``schedule.cron`` of the config

Every parameter is typed (pydantic, via the flow signatures): the UI shows a form, and the server
refuses parameters that do not validate (``enforce_parameter_schema``). Single stages run on the
previous stage's artifacts under the config's data root, exactly like ``d2a stage``.

    d2a server                                                   # a server + these deployments
    python -m flows.server serve --config configs/demo.yaml      # only serve, against $PREFECT_API_URL
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from flows import artifacts
from flows.pipeline import (
    ConfigPath,
    Overrides,
    data_to_adapter,
    evaluate_step,
    invalidate,
    nocache,
    promote_step,
    scrape_step,
    train_step,
)
from flows.prepare import prepare
from flows.rescrape import rescrape_and_retrain
from tasks.core.config import REPO_ROOT, load_config, resolve_path
from tasks.core.manifest import require_manifest
from tasks.extract import extract

ForceOne = Annotated[bool, Field(description="Re-run this stage even if its inputs and config are unchanged.")]


# ------------------------------------------------------------------------------- stage flows
@flow(name="stage-scrape", log_prints=True)
def scrape_flow(config: ConfigPath = "configs/demo.yaml", overrides: Overrides = None,
                force: ForceOne = False) -> dict[str, Any]:
    """Scrape the allow-listed sources (conditional requests) and extract ``extracted/``.

    Args:
        config: Pipeline YAML, relative to the repository root.
        overrides: section.key=value overrides, e.g. data_root=data/exp1.
        force: Re-extract even if raw/ and the extract config are unchanged (scrape always runs).
    """
    cfg = load_config(config, overrides or [])
    if force:
        invalidate(cfg, {"extract"}, get_run_logger())
    d = cfg.model_dump(mode="json")
    m = scrape_step(cfg, d)
    e = nocache(extract)(d)
    return {"scrape": m["counts"], "extract": e["counts"]}


@flow(name="stage-prepare", log_prints=True)
def prepare_flow(config: ConfigPath = "configs/demo.yaml", overrides: Overrides = None,
                 force: ForceOne = False) -> dict[str, Any]:
    """Clean+dedup, split, mix and tokenize ``extracted/`` (the ``prepare`` subflow).

    Args:
        config: Pipeline YAML, relative to the repository root.
        overrides: section.key=value overrides, e.g. data_root=data/exp1.
        force: Re-run clean, split, mix and tokenize even if their inputs are unchanged.
    """
    cfg = load_config(config, overrides or [])
    if force:
        invalidate(cfg, {"clean", "split", "mix", "tokenize"}, get_run_logger())
    out = prepare(config=config, overrides=overrides)
    artifacts.publish_mixture(cfg, out["mix"])
    return {k: v.get("counts") for k, v in out.items()}


@flow(name="stage-train", log_prints=True)
def train_flow(config: ConfigPath = "configs/demo.yaml", overrides: Overrides = None,
               force: ForceOne = False) -> dict[str, Any]:
    """Train the QLoRA adapter on ``tokenized/``; resumes from the run's newest checkpoint.

    Args:
        config: Pipeline YAML, relative to the repository root.
        overrides: section.key=value overrides, e.g. data_root=data/exp1.
        force: Start the run over (its checkpoints, adapter and metrics are removed first).
    """
    from tasks.core.model import load_tokenizer, resolve_base, tokenizer_fingerprint
    from tasks.tokenize.loader import tokenized_dir

    cfg = load_config(config, overrides or [])
    if force:
        invalidate(cfg, {"train"}, get_run_logger())
    tok = load_tokenizer(resolve_base(cfg.model, cfg.root / "models"), cfg.model)
    tok_m = require_manifest(tokenized_dir(cfg, tokenizer_fingerprint(tok)), "tokenize")
    m = train_step(cfg, cfg.model_dump(mode="json"), tok_m)
    return {"run_dir": m["run_dir"], "adapter": m["adapter"], "counts": m["counts"]}


@flow(name="stage-evaluate", log_prints=True)
def evaluate_flow(config: ConfigPath = "configs/demo.yaml", overrides: Overrides = None,
                  force: ForceOne = False,
                  promote: Annotated[bool, Field(description="Then run the promotion gate (mark current if not "
                                                             "worse than the current adapter).")] = False,
                  ) -> dict[str, Any]:
    """Held-out loss per category, base vs adapter, for the config's training run; dashboards.

    Args:
        config: Pipeline YAML, relative to the repository root.
        overrides: section.key=value overrides, e.g. data_root=data/exp1.
        force: Re-evaluate even if eval.json is up to date.
        promote: Then run the promotion gate (mark current if not worse than the current adapter).
    """
    cfg = load_config(config, overrides or [])
    if force:
        invalidate(cfg, {"evaluate"}, get_run_logger())
    report = evaluate_step(cfg, cfg.model_dump(mode="json"))
    out = {"run_dir": report["run_dir"], "overall": report["overall"], "dashboards": report["dashboards"]}
    if promote:
        p = promote_step(cfg, Path(report["run_dir"]), get_run_logger())
        out["promoted"], out["promotion_reasons"] = p["promoted"], p["reasons"]
    return out


@flow(name="generate", log_prints=True)
def generate_flow(
    config: ConfigPath = "configs/demo.yaml",
    overrides: Overrides = None,
    prompt: Annotated[str, Field(min_length=1, description="One user turn.")] = "Give me a simple recipe for red lentil soup.",
    run_dir: Annotated[str | None, Field(description="runs/<run_id> directory; empty = the current adapter "
                                                     "(<data root>/current.json).")] = None,
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 200,
    temperature: Annotated[float, Field(ge=0, le=5, description="0 = greedy.")] = 0.0,
) -> dict[str, str]:
    """Answer a prompt with a trained adapter (base loaded with the quantization the run recorded).

    Args:
        config: Pipeline YAML, relative to the repository root.
        overrides: section.key=value overrides, e.g. data_root=data/exp1.
        prompt: One user turn.
        run_dir: runs/<run_id> directory; empty = the current adapter (<data root>/current.json).
        max_new_tokens: Most tokens to generate.
        temperature: 0 = greedy.
    """
    from tasks.adapter.generate import run_generate
    from tasks.adapter.promote import read_current

    cfg = load_config(config, overrides or [])
    if run_dir:
        rd = resolve_path(run_dir)
    else:
        cur = read_current(cfg.root)
        if cur is None:
            raise FileNotFoundError(f"no current adapter under {cfg.root} (current.json): run data-to-adapter first, "
                                    "or give run_dir")
        rd = Path(cur["run_dir"])
    gen = cfg.generate.model_copy(update={"max_new_tokens": max_new_tokens, "temperature": temperature})
    answer = run_generate(rd, prompt, gen)
    get_run_logger().info("%s -> %s", prompt, answer)
    artifacts.publish_markdown(cfg, "generate", f"**Adapter:** `{rd.name}`\n\n**Prompt:** {prompt}\n\n**Answer:** {answer}",
                               f"answer from {rd.name}")
    return {"run_dir": str(rd), "prompt": prompt, "answer": answer}


# ------------------------------------------------------------------------------- deployments
STAGE_FLOWS = {"scrape": scrape_flow, "prepare": prepare_flow, "train": train_flow, "evaluate": evaluate_flow,
               "generate": generate_flow}


def deployment_name(config: str) -> str:
    return Path(config).stem


def build_deployments(config: str = "configs/demo.yaml", with_schedule: bool = True) -> list[Any]:
    """RunnerDeployments for one pipeline config; the config path is each form's default."""
    from prefect.schedules import Cron

    cfg = load_config(config)  # fail early, with the key, on a broken config
    name = deployment_name(config)
    params = {"config": config}
    tags = ["data-to-adapter", name]
    deps = [data_to_adapter.to_deployment(name=name, parameters=params, tags=tags,
                                          description="The whole DAG: scrape -> ... -> evaluate -> promote.")]
    for stage, fl in STAGE_FLOWS.items():
        deps.append(fl.to_deployment(name=name, parameters=params, tags=[*tags, "stage"],
                                     description=(fl.description or "").strip()))
    sc = cfg.schedule
    schedules = [Cron(sc.cron, timezone=sc.timezone, active=sc.active)] if with_schedule and sc.cron else None
    deps.append(rescrape_and_retrain.to_deployment(
        name=name, parameters=params, tags=[*tags, "scheduled"], schedules=schedules,
        description=f"Re-scrape; retrain only when > {sc.change_threshold:.0%} of pages changed; promote only a "
                    f"not-worse adapter. Schedule: {sc.cron or 'none'} ({sc.timezone})."))
    return deps


def serve_deployments(configs: list[str], limit: int | None = None, with_schedule: bool = True) -> None:
    """Register the deployments and execute their runs until SIGTERM/Ctrl-C (blocks)."""
    from prefect import serve

    os.chdir(REPO_ROOT)  # entrypoints are recorded relative to the repository
    deps = [d for c in configs for d in build_deployments(c, with_schedule)]
    serve(*deps, limit=limit, print_starting_message=True)
