"""A real Prefect server on a free loopback port, the project's deployments on their work pools with
a process worker per pool (what ``d2a server`` runs), runs triggered through the API: the whole DAG
on the demo config (small), its artifacts, typed parameters, the schedule, and cancelling a running
train stage (no training process may survive).

The helpers at the top are shared with test_ui.py, test_cache.py and test_rescrape.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from scrapers.schema import REPO_ROOT as REPO

pytestmark = pytest.mark.integration  # the real SmolLM2 through the whole DAG (CPU, minutes)
SMALL = {  # the demo config, shrunk so a whole DAG run is a few minutes on a shared CPU
    "tokenize": {"seq_len": 128},
    "train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "eval_batches": 1, "warmup_steps": 1},
    "evaluate": {"max_rows_per_category": 2, "max_new_tokens": 4},
    "tracking": {"tensorboard": False, "wandb": "off"},
}


# ------------------------------------------------------------------------------------ helpers
def write_config(path: Path, root: Path, site: Path, port: int, **sections) -> Path:
    """The demo config with its data root, demo-site copy and port in tmp, and SMALL shapes."""
    d = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    d["data_root"] = str(root)
    d["demo_site"] = {**d["demo_site"], "root": str(site), "port": port}
    for k, v in {**SMALL, **sections}.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@dataclass
class Prepared:
    root: Path
    site: Path
    port: int


def prepared_root(tmp_path_factory) -> Prepared:
    """A data root on which the whole small DAG has run once (built once per session, in-process
    with a temporary Prefect API), with its adapter current. Tests work on ``clone``s of it."""
    from flows.server import free_port

    base = tmp_path_factory.getbasetemp() / "d2a-prepared"
    meta = base / "prepared.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        return Prepared(Path(m["root"]), Path(m["site"]), m["port"])
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    site, root, port = base / "site", base / "root", free_port()
    shutil.copytree(REPO / "data" / "demo_site", site)
    cfg = write_config(base / "prepared.yaml", root, site, port)
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import data_to_adapter

    with prefect_test_harness(server_startup_timeout=120):
        summary = data_to_adapter(config=str(cfg))
    assert summary["promoted"] is True
    meta.write_text(json.dumps({"root": str(root), "site": str(site), "port": port}))
    return Prepared(root, site, port)


def clone(p: Prepared, dst: Path) -> Prepared:
    """A private copy of a prepared root (and of its site): absolute paths inside are rewritten,
    the converted base model is shared through a symlink (read-only)."""
    dst.mkdir(parents=True, exist_ok=True)
    root, site = dst / "root", dst / "site"
    shutil.copytree(p.site, site)
    shutil.copytree(p.root, root, symlinks=True, ignore=shutil.ignore_patterns("models"))
    (root / "models").symlink_to(p.root / "models", target_is_directory=True)
    old, new = str(p.root), str(root)
    rewritten = set()
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink() and f.suffix in (".json", ".jsonl", ".yaml") and "models" not in f.parts:
            text = f.read_text(encoding="utf-8")
            if old in text:
                f.write_text(text.replace(old, new), encoding="utf-8")
                rewritten.add(f)
    # a rewritten file is a new file: its stage's manifest must say so, or the size check (rightly)
    # calls the output damaged and rebuilds it
    from tasks.core.manifest import sha256_file

    for mf in root.rglob("manifest.json"):
        m = json.loads(mf.read_text(encoding="utf-8"))
        touched = False
        for rel in list(m.get("files") or {}):
            f = mf.parent / rel
            if f in rewritten:
                m["files"][rel] = sha256_file(f)
                if rel in (m.get("sizes") or {}):
                    m["sizes"][rel] = f.stat().st_size
                touched = True
        if touched:
            mf.write_text(json.dumps(m, indent=2), encoding="utf-8")
    return Prepared(root, site, p.port)


def training_workers(root: Path) -> list:
    """Live training processes (the worker, or accelerate's launcher and ranks) of runs under ``root``."""
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cl = p.info["cmdline"] or []
            if "tasks.train" in cl and "worker" in cl and any(str(root) in a for a in cl):
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
    return out


@dataclass
class Served:
    api: str
    ui: str
    env: dict
    config: Path
    name: str  # deployment name (the config's stem)
    root: Path
    logs: Path


@contextlib.contextmanager
def served(tmp: Path, config: Path, root: Path):
    """``prefect server start`` on a free port, ``d2a deploy`` of ``config``, and a process worker per
    pool (``prefect worker start --pool ... --type process``); stops them all."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pools import start_worker
    from flows.server import deploy, free_port, pools_of, server_env, start_server, stop_process, wait_healthy

    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING")}
    env = server_env("127.0.0.1", port, home=tmp / "prefect-home", base=base)
    env.pop("PREFECT_SERVER_DATABASE_CONNECTION_URL", None)  # always this test's own SQLite
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    server_log, deploy_log = open(logs / "server.log", "w"), open(logs / "deploy.log", "w")
    worker_log = open(logs / "serve.log", "w")  # both workers: the flow runs' output
    server = None
    workers = []
    try:
        server = start_server("127.0.0.1", port, env, server_log)
        wait_healthy(env["PREFECT_API_URL"], timeout=180, proc=server)
        deploy([str(config)], env, deploy_log)
        workers = [start_worker(pool, env, worker_log, mark=pool) for pool in pools_of([str(config)])]
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            _wait_deployments(8, workers, timeout=60)
            yield Served(env["PREFECT_API_URL"], f"http://127.0.0.1:{port}", env, config, config.stem, root, logs)
    finally:
        for w in workers:
            stop_process(w, timeout=60)
        if server is not None:
            stop_process(server, timeout=30)
        server_log.close()
        deploy_log.close()
        worker_log.close()


def _wait_deployments(n: int, workers: list[subprocess.Popen], timeout: float) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as c:
        while time.monotonic() < deadline:
            assert all(w.poll() is None for w in workers), "a worker died; see its log"
            if len(c.read_deployments()) >= n:
                return
            time.sleep(1)
    raise TimeoutError("deployments were not registered in time")


def run_tree(flow_run_id) -> list:
    """A flow run and its descendants (subflows, and the runs it handed to the GPU pool)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as c:
        out, todo = [], [c.read_flow_run(flow_run_id)]
        while todo:
            fr = todo.pop()
            out.append(fr)
            todo += c.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[fr.id])))
        return out


def wait_final(flow_run_id, timeout: float):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as c:
        while time.monotonic() < deadline:
            fr = c.read_flow_run(flow_run_id)
            if fr.state is not None and fr.state.is_final():
                return fr
            time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout:.0f}s")


def artifacts_of(flow_run_id) -> dict[str, list]:
    """Artifacts of a flow run and of its descendants (train and evaluate publish in their own runs)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    ids = [r.id for r in run_tree(flow_run_id)]
    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
    out: dict[str, list] = {}
    for a in arts:
        out.setdefault(a.key or "", []).append(a)
    return out


# -------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from flows.server import free_port

    tmp = tmp_path_factory.mktemp("server")
    site, root = tmp / "site", tmp / "root"
    shutil.copytree(REPO / "data" / "demo_site", site)
    config = write_config(tmp / "apidemo.yaml", root, site, free_port())
    with served(tmp, config, root) as s:
        yield s


def test_deployments_have_typed_parameters_and_the_configured_schedule(server):
    from prefect.client.orchestration import get_client

    from tasks.core.config import load_config

    with get_client(sync_client=True) as c:
        deps = {f"{c.read_flow(d.flow_id).name}/{d.name}": d for d in c.read_deployments()}
        assert set(deps) == {f"{f}/{server.name}" for f in ("data-to-adapter", "stage-scrape", "stage-prepare",
                                                               "stage-train", "stage-train-node", "stage-evaluate",
                                                               "generate", "rescrape-and-retrain")}
        dta = deps[f"data-to-adapter/{server.name}"]
        props = dta.parameter_openapi_schema["properties"]
        assert props["config"]["type"] == "string" and dta.parameters == {"config": str(server.config)}
        assert "train" in props["force"]["anyOf"][0]["items"]["enum"]
        assert props["promote"]["type"] == "boolean" and props["overrides"]["description"]
        assert dta.enforce_parameter_schema
        # the server refuses parameters that do not validate (what the UI form prevents)
        with pytest.raises(Exception, match=r"(?i)validation|422|409|unprocessable|conflict"):
            c.create_flow_run_from_deployment(dta.id, parameters={"force": ["no-such-stage"]})
        gen = deps[f"generate/{server.name}"].parameter_openapi_schema["properties"]
        assert gen["max_new_tokens"]["type"] == "integer" and gen["max_new_tokens"]["minimum"] == 1
        resc = deps[f"rescrape-and-retrain/{server.name}"]
        sched = load_config(server.config).schedule
        assert [s.schedule.cron for s in resc.schedules] == [sched.cron]
        assert resc.schedules[0].schedule.timezone == sched.timezone and resc.schedules[0].active
        assert not resc.paused


@pytest.mark.timeout(1500)
def test_data_to_adapter_through_the_api_completes_with_artifacts(server):
    from prefect.deployments import run_deployment

    fr = run_deployment(f"data-to-adapter/{server.name}", timeout=0)
    fr = wait_final(fr.id, timeout=1400)
    assert fr.state.is_completed(), (fr.state, (server.logs / "serve.log").read_text()[-4000:])
    arts = artifacts_of(fr.id)
    want = {"scrape-report", "data-mixture", "training", "training-progress", "eval-base-vs-adapter",
            "dashboard-training", "dashboard-evaluation", "adapter", "lineage", "stages", "promotion", "sample"}
    assert {f"demo-{k}" for k in want} <= set(arts), sorted(arts)
    scrape_md = arts["demo-scrape-report"][0].data
    assert "not modified (304)" in scrape_md and "robots" in scrape_md  # refused-by-reason table
    mix = arts["demo-data-mixture"][0].data
    assert "achieved share" in mix and "recipes" in mix
    ev = arts["demo-eval-base-vs-adapter"][0].data
    assert "adapter loss" in ev and "OVERALL" in ev
    assert "data snapshot" in arts["demo-lineage"][0].data and "SmolLM2" in arts["demo-lineage"][0].data
    assert arts["demo-training-progress"][0].data == 100.0
    assert "adapter" in str(arts["demo-adapter"][0].data)
    cur = json.loads((server.root / "current.json").read_text())
    assert (Path(cur["adapter"]) / "adapter_model.safetensors").is_file()
    assert cur["lineage"]["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cur["lineage"]["data_chain"][-1]["stage"] == "scrape"


@pytest.mark.timeout(900)
def test_cancelling_a_running_train_stage_leaves_no_training_process(server):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    assert list((server.root / "tokenized").glob("*/manifest.json")), "needs the tokenized data of the test above"
    # a longer run (new fingerprint -> its own run dir), cancelled once the training loop is stepping
    fr = run_deployment(f"stage-train/{server.name}", timeout=0,
                        parameters={"overrides": ["train.max_steps=500", "train.save_every=1000",
                                                  "train.eval_every=1000"]})
    deadline = time.monotonic() + 600
    run_dir = None
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as c:
            assert not c.read_flow_run(fr.id).state.is_final(), "the train stage ended before it could be cancelled"
        runs = [d for d in (server.root / "runs").glob("*") if (d / "metrics.jsonl").is_file()
                and yaml.safe_load((d / "config.yaml").read_text())["train"]["max_steps"] == 500
                and (d / "metrics.jsonl").read_text().strip()]
        if runs and training_workers(server.root):
            run_dir = runs[0]
            break
        time.sleep(2)
    assert run_dir is not None, "training never started stepping"
    assert training_workers(server.root)
    with get_client(sync_client=True) as c:
        c.set_flow_run_state(fr.id, Cancelling(), force=True)
    deadline = time.monotonic() + 180
    while training_workers(server.root) and time.monotonic() < deadline:
        time.sleep(1)
    assert training_workers(server.root) == []
    fr = wait_final(fr.id, timeout=120)
    assert fr.state.is_cancelled(), fr.state
    assert not (run_dir / "adapter").exists()  # it never finished


def test_d2a_server_starts_prints_the_ui_and_stops_cleanly(tmp_path):
    """``d2a server`` itself: prints the UI address, deploys, starts a worker per pool, and SIGTERM leaves
    nothing running."""
    import signal

    import psutil

    from flows.server import free_port

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    config = write_config(tmp_path / "srv.yaml", tmp_path / "root", REPO / "data" / "demo_site", free_port())
    with open(tmp_path / "out.log", "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "flows.cli", "server", "--port", str(port),
                              "--config", str(config)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "workers polling" not in (tmp_path / "out.log").read_text():
            assert p.poll() is None, (tmp_path / "out.log").read_text()[-3000:]
            time.sleep(1)
        out = (tmp_path / "out.log").read_text()
        assert f"Prefect UI: http://127.0.0.1:{port}" in out
        assert (tmp_path / "home" / "prefect.db").is_file()  # SQLite under PREFECT_HOME
        tree = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        assert len(tree) >= 4  # d2a, the server, a worker per pool
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=150)
        time.sleep(1)
        alive = [q for q in tree if q.is_running() and q.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], [q.cmdline() for q in alive]
        assert re.search(r"stopped\s*$", (tmp_path / "out.log").read_text())
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
