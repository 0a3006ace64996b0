"""The project's deployments: what ``d2a deploy`` registers against a Prefect API (and ``d2a server``
on this machine), each on its work pool.

For each pipeline config (deployment name = the config's file stem, e.g. ``demo``):

  data-to-adapter/<name>        CPU pool  the whole DAG; hands train and evaluate to the GPU pool
  stage-scrape/<name>           CPU pool  scrape + extract
  stage-prepare/<name>          CPU pool  clean, split, mix, tokenize, on ``extracted/``
  rescrape-and-retrain/<name>   CPU pool  scheduled: ``schedule.cron`` of the config
  stage-train/<name>            GPU pool  QLoRA training (supervised subprocess); with train.nnodes > 1
                                          node 0, which starts one stage-train-node run per other node
  stage-train-node/<name>       GPU pool  one further node of a multi-node training
  stage-evaluate/<name>         GPU pool  base vs adapter per category (+ optional promotion)
  generate/<name>               GPU pool  answer a prompt with the current (or a given) adapter

Every parameter is typed (pydantic, via the flow signatures): the UI shows a form, and the server
refuses parameters that do not validate (``enforce_parameter_schema``). What the parameters may
change beyond that is checked by flows/guard.py. Every deployment allows one run at a time
(``concurrency_limit=1``; further runs wait in AwaitingConcurrencySlot), and a run holds its data
root's lock (flows/guard.py) while it works. Entrypoints are module paths
(``flows.pipeline.data_to_adapter``): a worker imports them from the project installed where it runs
(the same checkout or image on every node), so nothing is built or pushed (``build=False, push=False``).

    d2a deploy --config configs/demo.yaml        # pools (if missing), deployments, automations
    d2a server                                   # a server + these deployments + one worker per pool
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from pydantic import Field

from flows import artifacts
from flows.guard import ParameterRefused, check_path_inside, check_run_parameters, data_root_lock
from flows.pipeline import (
    ConfigPath,
    Overrides,
    data_to_adapter,
    evaluate_step,
    extract_step,
    invalidate,
    promote_step,
    scrape_step,
    train_step,
)
from flows.pools import placement, publish_placement
from flows.prepare import prepare, stage_options
from flows.rescrape import rescrape_and_retrain
from tasks.core.config import REPO_ROOT, PipelineConfig, config_from_dict, load_config, resolve_path
from tasks.core.manifest import require_manifest

ForceOne = Annotated[bool, Field(description="Re-run this stage even if its inputs and config are unchanged.")]


ContinueFromCurrent = Annotated[bool, Field(description="Start LoRA from the current adapter (<data root>/current.json), "
                                                          "as rescrape-and-retrain does with schedule.continue_from_previous.")]


@contextlib.contextmanager
def _stage_run(config: str, overrides: list[str] | None, stage: str, lock: bool = True,
               continue_from_current: bool = False):
    """Checked parameters, the data root's lock (unless read-only) and a placement record."""
    check_run_parameters(config, overrides)
    cfg = load_config(config, overrides or [])
    if continue_from_current:  # the path comes from the data root, never from a parameter
        from tasks.adapter.promote import read_current

        cur = read_current(cfg.root)
        if cur is None:
            raise FileNotFoundError(f"continue_from_current: no current adapter under {cfg.root}")
        d = cfg.model_dump(mode="json")
        d["train"]["init_adapter"] = cur["adapter"]
        cfg = config_from_dict(d)
    with data_root_lock(cfg) if lock else contextlib.nullcontext():
        yield cfg
    publish_placement(cfg, [placement(stage)])


# ------------------------------------------------------------------------------- stage flows
@flow(name="stage-scrape", log_prints=True)
def scrape_flow(config: ConfigPath = "configs/demo.yaml", overrides: Overrides = None,
                force: ForceOne = False) -> dict[str, Any]:
    """Scrape the allow-listed sources (conditional requests) and extract ``extracted/``.

    Args:
        config: Pipeline YAML, relative to the repository root.
        overrides: section.key=value overrides of the allowed settings (server.allowed_overrides), e.g. train.max_steps=20.
        force: Re-extract even if raw/ and the extract config are unchanged (scrape always runs).
    """
    with _stage_run(config, overrides, "scrape") as cfg:
        if force:
            invalidate(cfg, {"extract"}, get_run_logger())
        d = cfg.model_dump(mode="json")
        m = scrape_step(cfg, d)
        e = extract_step(cfg, d)
    return {"scrape": m["counts"], "extract": e["counts"]}


@flow(name="stage-prepare", log_prints=True)
def prepare_flow(config: ConfigPath = "configs/demo.yaml", overrides: Overrides = None,
                 force: ForceOne = False) -> dict[str, Any]:
    """Clean+dedup, split, mix and tokenize ``extracted/`` (the ``prepare`` subflow).

    Args:
        config: Pipeline YAML, relative to the repository root.
        overrides: section.key=value overrides of the allowed settings (server.allowed_overrides), e.g. train.max_steps=20.
        force: Re-run clean, split, mix and tokenize even if their inputs are unchanged.
    """
    with _stage_run(config, overrides, "prepare") as cfg:
        if force:
            invalidate(cfg, {"clean", "split", "mix", "tokenize"}, get_run_logger())
        out = prepare(config=config, overrides=overrides)
        artifacts.publish_mixture(cfg, out["mix"])
    return {k: v.get("counts") for k, v in out.items()}


@flow(name="stage-train", log_prints=True)
def train_flow(config: ConfigPath = "configs/demo.yaml", overrides: Overrides = None,
               force: ForceOne = False, continue_from_current: ContinueFromCurrent = False) -> dict[str, Any]:
    """Train the QLoRA adapter on ``tokenized/``; resumes from the run's newest checkpoint.

    Args:
        config: Pipeline YAML, relative to the repository root.
        overrides: section.key=value overrides of the allowed settings (server.allowed_overrides), e.g. train.max_steps=20.
        force: Start the run over (its checkpoints, adapter and metrics are removed first).
        continue_from_current: Start LoRA from the current adapter (rescrape's warm start; the path is read from the data root).
    """
    with _stage_run(config, overrides, "train", continue_from_current=continue_from_current) as cfg:
        if force:
            invalidate(cfg, {"train"}, get_run_logger())
        tok_m = _tokenized_manifest(cfg)
        if cfg.train.nnodes > 1 and _deployment_name():
            m = multinode_train(cfg, config, overrides, tok_m)
        else:
            m = train_step(cfg, cfg.model_dump(mode="json"), tok_m)
    return {"run_dir": m["run_dir"], "adapter": m["adapter"], "counts": m["counts"]}


@flow(name="stage-evaluate", log_prints=True)
def evaluate_flow(config: ConfigPath = "configs/demo.yaml", overrides: Overrides = None,
                  force: ForceOne = False,
                  promote: Annotated[bool, Field(description="Then run the promotion gate (mark current if not "
                                                             "worse than the current adapter).")] = False,
                  continue_from_current: ContinueFromCurrent = False,
                  ) -> dict[str, Any]:
    """Held-out loss per category, base vs adapter, for the config's training run; dashboards.

    Args:
        config: Pipeline YAML, relative to the repository root.
        overrides: section.key=value overrides of the allowed settings (server.allowed_overrides), e.g. train.max_steps=20.
        force: Re-evaluate even if eval.json is up to date.
        promote: Then run the promotion gate (mark current if not worse than the current adapter).
        continue_from_current: The run trained from the current adapter (rescrape's warm start).
    """
    with _stage_run(config, overrides, "evaluate", continue_from_current=continue_from_current) as cfg:
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
        overrides: section.key=value overrides of the allowed settings (server.allowed_overrides), e.g. train.max_steps=20.
        prompt: One user turn.
        run_dir: runs/<run_id> directory; empty = the current adapter (<data root>/current.json).
        max_new_tokens: Most tokens to generate.
        temperature: 0 = greedy.
    """
    from tasks.adapter.generate import run_generate
    from tasks.adapter.promote import read_current

    check_run_parameters(config, overrides)
    cfg = load_config(config, overrides or [])
    check_path_inside(cfg, "run_dir", run_dir)
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


# ------------------------------------------------------------------------ multi-node training
def _deployment_name() -> str | None:
    from prefect.runtime import deployment

    return deployment.name or None


def _tokenized_manifest(cfg: PipelineConfig) -> dict[str, Any]:
    from tasks.core.model import model_tokenizer, tokenizer_fingerprint
    from tasks.tokenize.loader import tokenized_dir

    tok = model_tokenizer(cfg.model, cfg.root / "models")
    return require_manifest(tokenized_dir(cfg, tokenizer_fingerprint(tok)), "tokenize")


def node_address() -> str:
    """The address other nodes reach this one at: $D2A_NODE_ADDRESS (set it in the GPU worker's
    environment where the hostname does not resolve to the cluster network), else the hostname's."""
    return os.environ.get("D2A_NODE_ADDRESS") or socket.gethostbyname(socket.gethostname())


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _with_node(cfg: PipelineConfig, rank: int, endpoint: str) -> PipelineConfig:
    d = cfg.model_dump(mode="json")
    d["train"].update(node_rank=rank, rdzv_endpoint=endpoint)
    return config_from_dict(d)


def _node_runs_final(ids: list[Any], timeout: float) -> list[Any]:
    import time

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as c:
        while True:
            runs = [c.read_flow_run(i) for i in ids]
            if all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return runs
            time.sleep(2)


def _cancel(ids: list[Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as c:
        for i in ids:
            with contextlib.suppress(Exception):
                if not c.read_flow_run(i).state.is_final():
                    c.set_flow_run_state(i, Cancelling(message="another node of this training attempt failed"),
                                         force=True)


@task(name="train-multinode-attempt")
def multinode_attempt(cfg_dict: dict, config: str, overrides: list[str] | None) -> dict:
    """One attempt of an N-node training: this flow run is node 0 and hosts the c10d rendezvous; nodes
    1..N-1 are ``stage-train-node`` runs on the GPU pool, each launching torchrun with its node rank.
    Any node failing fails the attempt: the others are cancelled (their training process groups stop),
    and the retry starts every node again, resuming from the newest checkpoint in the shared run dir."""
    from prefect.deployments import run_deployment
    from prefect.logging import get_run_logger

    from tasks.train.stage import TrainingFailed, run_train

    logger = get_run_logger()
    cfg = config_from_dict(cfg_dict)
    tc = cfg.train
    endpoint = tc.rdzv_endpoint
    if not endpoint:
        host = node_address()
        endpoint = f"{host}:{cfg.pools.rdzv_port or _free_port(host)}"
    name = _deployment_name()
    logger.info("multi-node training: %d nodes, rendezvous on node 0 at %s", tc.nnodes, endpoint)
    ids = [run_deployment(f"stage-train-node/{name}", timeout=0,
                          parameters={"config": config, "overrides": overrides, "node_rank": r,
                                      "rdzv_endpoint": endpoint}).id for r in range(1, tc.nnodes)]
    try:
        m = run_train(_with_node(cfg, 0, endpoint), logger)
    except BaseException:
        _cancel(ids)
        raise
    runs = _node_runs_final(ids, timeout=600)
    bad = [r for r in runs if not (r.state and r.state.is_completed())]
    if bad:
        _cancel(ids)
        raise TrainingFailed("node run(s) " + ", ".join(f"{r.name} ({r.state.type.value if r.state else '?'})"
                                                        for r in bad) + " did not complete")
    return m


def multinode_train(cfg: PipelineConfig, config: str, overrides: list[str] | None,
                    tok_m: dict[str, Any]) -> dict[str, Any]:
    from flows import artifacts as arts
    from flows.pipeline import expected_steps
    from tasks.train.stage import run_dir_for

    opts = stage_options(cfg, "train")
    with arts.training_progress(cfg, run_dir_for(cfg), expected_steps(cfg, tok_m)):
        m = multinode_attempt.with_options(**opts)(
            cfg.model_dump(mode="json"), config, overrides)
    arts.publish_training(cfg, Path(m["run_dir"]), m)
    return m


@flow(name="stage-train-node", log_prints=True)
def train_node_flow(config: ConfigPath = "configs/demo.yaml", overrides: Overrides = None,
                    node_rank: Annotated[int, Field(ge=1)] = 1,
                    rdzv_endpoint: Annotated[str, Field(pattern=r"^[A-Za-z0-9.:\[\]-]+:[0-9]+$")] = "127.0.0.1:29500",
                    ) -> dict[str, Any]:
    """One further node (rank >= 1) of a multi-node training started by a stage-train run.

    Args:
        config: Pipeline YAML (the stage-train run's).
        overrides: The stage-train run's overrides.
        node_rank: This node's rank.
        rdzv_endpoint: host:port of the rendezvous on node 0.
    """
    from prefect.runtime import flow_run

    from tasks.train.stage import run_train

    parent = flow_run.parent_flow_run_id
    if not parent or _flow_name_of(parent) != "stage-train":
        raise ParameterRefused("stage-train-node runs only as a node of a stage-train run (its rendezvous "
                               "endpoint and rank come from that run), not on its own")
    with _stage_run(config, overrides, f"train-node-{node_rank}") as cfg:
        if not 1 <= node_rank < cfg.train.nnodes:
            raise ParameterRefused(f"node_rank {node_rank} is outside 1..{cfg.train.nnodes - 1} (train.nnodes)")
        m = run_train(_with_node(cfg, node_rank, rdzv_endpoint), get_run_logger())
    return {"run_dir": m["run_dir"], "node_rank": node_rank}


def _flow_name_of(flow_run_id: Any) -> str | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        fr = c.read_flow_run(flow_run_id)
        return c.read_flow(fr.flow_id).name


# ------------------------------------------------------------------------------- deployments
CPU_FLOWS = {"scrape": scrape_flow, "prepare": prepare_flow}
GPU_FLOWS = {"train": train_flow, "train-node": train_node_flow, "evaluate": evaluate_flow, "generate": generate_flow}
STAGE_FLOWS = {**CPU_FLOWS, **GPU_FLOWS}


def deployment_name(config: str) -> str:
    return Path(config).stem


def build_deployments(config: str = "configs/demo.yaml", with_schedule: bool = True) -> list[Any]:
    """RunnerDeployments for one pipeline config, each with its work pool; the config path is each
    form's default. Entrypoints are module paths (``flows.pipeline.data_to_adapter``): a worker runs
    them from the installed project, wherever its checkout is."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    cfg = load_config(config)  # fail early, with the key, on a broken config
    name = deployment_name(config)
    params = {"config": config}
    tags = ["data-to-adapter", name]
    one = ConcurrencyLimitConfig(limit=1, collision_strategy="ENQUEUE")  # a second run waits for the first

    def dep(fl, pool: str, extra_tags: list[str], description: str, limit: Any = one, **kw: Any):
        return fl.to_deployment(name=name, parameters=params, tags=[*tags, *extra_tags], description=description,
                                work_pool_name=pool, concurrency_limit=limit,
                                entrypoint_type=EntrypointType.MODULE_PATH, **kw)

    cpu, gpu = cfg.pools.cpu, cfg.pools.gpu
    deps = [dep(data_to_adapter, cpu, [], "The whole DAG: scrape -> ... -> evaluate -> promote (train and "
                                         "evaluate on the GPU pool).")]
    for stage, fl in STAGE_FLOWS.items():
        pool = cpu if stage in CPU_FLOWS else gpu
        limit = None if stage == "train-node" else one  # the nodes of one training run at once
        deps.append(dep(fl, pool, ["stage"], (fl.description or "").strip(), limit))
    sc = cfg.schedule
    schedules = [Cron(sc.cron, timezone=sc.timezone, active=sc.active)] if with_schedule and sc.cron else None
    deps.append(dep(rescrape_and_retrain, cpu, ["scheduled"],
                    f"Re-scrape; retrain only when > {sc.change_threshold:.0%} of pages changed; promote only a "
                    f"not-worse adapter. Schedule: {sc.cron or 'none'} ({sc.timezone}).", schedules=schedules))
    return deps


def deploy_config(config: str, with_schedule: bool = True) -> dict[str, Any]:
    """``d2a deploy``: the config's pools (created as process pools if missing), its deployments and its
    notification automations, against $PREFECT_API_URL. Returns what was registered."""
    from prefect.deployments.runner import deploy as deploy_many

    from flows.notify import ensure_automations
    from flows.pools import ensure_pool

    os.chdir(REPO_ROOT)
    cfg = load_config(config)
    created = [p for p, what in ((cfg.pools.cpu, "scrape, extract, data stages"),
                                 (cfg.pools.gpu, "train, evaluate, generate"))
               if ensure_pool(p, f"data-to-adapter: {what}")]
    deps = build_deployments(config, with_schedule)
    ids: list[Any] = []
    for pool in dict.fromkeys(d.work_pool_name for d in deps):
        ids += deploy_many(*[d for d in deps if d.work_pool_name == pool], work_pool_name=pool, build=False,
                           push=False, print_next_steps_message=False, ignore_warnings=True)
    automations = ensure_automations(cfg, ids)
    return {"config": config, "pools_created": created, "deployments": [f"{d.flow_name}/{d.name}" for d in deps],
            "automations": automations}
