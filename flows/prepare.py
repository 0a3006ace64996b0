"""The ``prepare`` subflow: clean+dedup -> split -> mix -> tokenize, on the extracted corpus.

Without a ``dask`` section the stages run in this process and fan their batches out to local worker
processes (``clean.workers``, ``tokenize.workers``). With ``dask.address`` set the stages run as
Prefect tasks on prefect-dask's DaskTaskRunner ("local": a distributed LocalCluster of
``dask.n_workers`` x ``dask.threads_per_worker``; otherwise the scheduler at that address), and each
stage submits its per-batch work (clean + MinHash, token counting, encoding) to the same cluster
from inside its task. Results are consumed in input order, so the outputs are byte-identical to
the local path. On a real cluster the data root must be on storage every worker can read.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.clean.stage import clean
from tasks.core._prefect import NO_RETRY
from tasks.core.config import DaskConfig, PipelineConfig, config_from_dict, load_config
from tasks.mix import mix
from tasks.split import split
from tasks.tokenize.stage import tokenize


def stage_options(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """Prefect task options: the stage's own retry policy (which failures are worth a retry) with the
    config's ``timeouts.<stage>`` numbers (how often, how long)."""
    from tasks.scrape import SCRAPE_RETRY
    from tasks.train.stage import TRAIN_RETRY

    policy = {"scrape": SCRAPE_RETRY, "train": TRAIN_RETRY}.get(stage, NO_RETRY)
    return policy.configured(getattr(cfg.timeouts, stage)).options()


def task_runner(d: DaskConfig):
    """DaskTaskRunner for the configured cluster, or None for the default (local) runner."""
    if not d.address:
        return None
    from prefect_dask import DaskTaskRunner

    if d.address == "local":
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": d.n_workers, "threads_per_worker": d.threads_per_worker,
                                              "processes": d.processes, "dashboard_address": None})
    return DaskTaskRunner(address=d.address)


@flow(name="prepare-stages")
def prepare_stages(d: dict[str, Any]) -> dict[str, Any]:
    """The four stages as task submissions, each waiting for the one before (the order is the DAG)."""
    out: dict[str, Any] = {}
    cfg = config_from_dict(d)
    for name, stage in (("clean", clean), ("split", split), ("mix", mix), ("tokenize", tokenize)):
        out[name] = stage.with_options(**stage_options(cfg, name)).submit(d).result()
    return out


def run_prepare(cfg: PipelineConfig) -> dict[str, Any]:
    d = cfg.model_dump(mode="json")
    runner = task_runner(cfg.dask)
    stages = prepare_stages if runner is None else prepare_stages.with_options(task_runner=runner)
    return stages(d)


@flow(name="prepare", log_prints=True)
def prepare(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Turn ``extracted/`` into packed, tokenized shards; returns the stages' manifests."""
    return run_prepare(load_config(config, overrides or []))
