"""Work pools, process workers and handing stages to the GPU pool.

A team runs one Prefect server (no GPU needed), a CPU pool whose workers run scrape, extract and the
data stages, and a GPU pool whose workers run train, evaluate (+ promotion) and generate. Both are
``process`` pools: a worker polls its pool and starts each flow run as a subprocess of itself, which
imports the flow by its module path from the project installed on that machine (the same checkout or
container image on every node; the data root on storage they all mount at the same path).

    prefect work-pool create d2a-cpu --type process
    prefect work-pool create d2a-gpu --type process
    prefect worker start --pool d2a-cpu --type process       # on any machine
    prefect worker start --pool d2a-gpu --type process       # on each GPU node

The whole-DAG flow, when it runs from a work-pool deployment, hands train and evaluate to the GPU
pool with ``run_deployment`` (a subflow run of its own deployment's ``stage-train`` /
``stage-evaluate``) and reads their results from the run directory, which is the contract.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from typing import IO, Any

from tasks.core.config import REPO_ROOT, PipelineConfig

log = logging.getLogger("flows.pools")
WORKER_MARK = "D2A_WORKER_MARK"  # set in a worker's environment; every flow run it starts inherits it


# --------------------------------------------------------------------------------- pools
def ensure_pool(name: str, description: str = "") -> bool:
    """Create a ``process`` work pool if it does not exist; True if created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as c:
        try:
            c.read_work_pool(name)
            return False
        except ObjectNotFound:
            c.create_work_pool(WorkPoolCreate(name=name, type="process", description=description,
                                              base_job_template=ProcessWorker.get_default_base_job_template()))
            return True


def start_worker(pool: str, env: dict[str, str], log_file: IO[Any] | None = None, mark: str | None = None,
                 name: str | None = None, limit: int | None = None) -> subprocess.Popen:
    """``prefect worker start --pool POOL --type process`` in its own process group (so stopping it stops
    its flow runs), with ``D2A_WORKER_MARK`` in its environment."""
    env = dict(env)
    if mark:
        env[WORKER_MARK] = mark
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    if name:
        cmd += ["--name", name]
    if limit:
        cmd += ["--limit", str(limit)]
    return subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=log_file,
                            stderr=subprocess.STDOUT if log_file else None, stdin=subprocess.DEVNULL,
                            start_new_session=True)


# ----------------------------------------------------------------------------- placement
def ancestry(pid: int | None = None) -> list[int]:
    """This process and its ancestors' pids, nearest first (from /proc or psutil)."""
    pid = os.getpid() if pid is None else pid
    out = []
    with contextlib.suppress(Exception):
        import psutil

        p = psutil.Process(pid)
        while p is not None:
            out.append(p.pid)
            p = p.parent()
    return out or [pid]


def placement(stage: str) -> dict[str, Any]:
    """Where a stage ran: host, process chain, the worker's marker and the flow run."""
    rec: dict[str, Any] = {"stage": stage, "host": socket.gethostname(), "pid": os.getpid(),
                           "ancestors": ancestry()[1:], "worker_mark": os.environ.get(WORKER_MARK)}
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        rec["flow_run"] = flow_run.name
    return rec


def publish_placement(cfg: PipelineConfig, records: list[dict[str, Any]]) -> None:
    """A table artifact of where each stage of this flow run ran (the tests read it back)."""
    from flows import artifacts

    rows = [{**r, "ancestors": " ".join(map(str, r["ancestors"]))} for r in records]
    artifacts.publish_table(cfg, "placement", rows, "Where each stage ran: host, pid, parent pids, worker marker")
    for r in records:
        log.info("placement: %s ran in pid %s on %s (worker %s)", r["stage"], r["pid"], r["host"], r["worker_mark"])


# ------------------------------------------------------------------------------ dispatch
def gpu_deployment_suffix(cfg: PipelineConfig) -> str | None:
    """The deployment name whose ``stage-*`` runs go to the GPU pool, or None to run in this process.

    auto: dispatch when this flow run itself came from a deployment on a work pool (a worker ran it);
    ``d2a run`` (no deployment) and ``serve`` (no pool) keep training in-process."""
    mode = cfg.pools.dispatch
    if mode == "local":
        return None
    from prefect.runtime import deployment, flow_run

    name = deployment.name
    if not name:
        if mode == "pools":
            raise RuntimeError("pools.dispatch=pools needs the flow to run from a deployment (d2a deploy)")
        return None
    if mode == "auto":
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as c:
            if not c.read_flow_run(flow_run.id).work_pool_name:
                return None
    return name


def run_stage_deployment(flow_name: str, suffix: str, parameters: dict[str, Any],
                         logger: logging.Logger | None = None) -> Any:
    """Run ``flow_name/suffix`` (a subflow run on its pool) and wait; raise unless it completed."""
    from prefect.deployments import run_deployment

    logger = logger or log
    logger.info("handing %s to its work pool (deployment %s/%s)", flow_name, flow_name, suffix)
    fr = run_deployment(f"{flow_name}/{suffix}", parameters=parameters, timeout=None, poll_interval=2)
    if fr.state is None or not fr.state.is_completed():
        st = fr.state
        raise RuntimeError(f"{flow_name}/{suffix} run {fr.name} ended {st.type.value if st else '?'}: "
                           f"{(st.message if st else '') or ''}")
    logger.info("%s/%s run %s completed", flow_name, suffix, fr.name)
    return fr

