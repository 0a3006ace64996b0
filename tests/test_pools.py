"""Running it as a team, for real, on this machine: a Prefect server with API authentication and CSRF
protection, a CPU pool and a GPU-labelled pool each with a real process worker (a subprocess with its
own environment marker), the deployments registered by ``d2a deploy``, runs triggered through the API
on the tiny model.

  * the whole DAG: train and evaluate run in the GPU worker's process tree, everything else in the CPU
    worker's (placement artifacts: pid, parent pids, marker), and the adapter equals a local run's;
  * a code-selecting override is refused, naming the key, and the failure posts to a webhook receiver;
  * a second run of the same config waits for the first (never interleaved), and the rescrape that
    comes while one runs skips with a log line and an artifact;
  * two-node training as two flow runs on the GPU pool (gloo), matching a one-process run;
  * ``d2a server --host 0.0.0.0`` without auth is refused; an unauthenticated API call gets 401.

One server and one pair of workers serve the whole module."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, read_metrics, tiny_config_dict
from safetensors.torch import load_file
from test_server import run_tree

pytestmark = pytest.mark.integration
TRAIN = {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "save_every": 2, "eval_every": 100,
         "warmup_steps": 1, "num_threads": 1}


def tiny_dag_config(path: Path, root: Path, site: Path, port: int, model_dir: Path, **sections) -> Path:
    """The demo config (demo site, sources, clean/split settings) with the tiny model and small shapes."""
    d = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    t = tiny_config_dict(root, model_dir)
    d.update(run_name="t", data_root=str(root), demo_site={**d["demo_site"], "root": str(site), "port": port},
             model=t["model"], lora=t["lora"], tokenize={"seq_len": 64, "rows_per_shard": 32},
             train={**t["train"], **TRAIN}, evaluate=t["evaluate"], tracking=t["tracking"],
             schedule={**d["schedule"], "cron": None})
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


class Hooks(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            Hooks.received.append(json.loads(body))
        except ValueError:
            Hooks.received.append({"raw": body.decode(errors="replace")})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


@dataclass
class Team:
    env: dict
    api: str
    auth: str
    config: Path
    root: Path
    site: Path
    port: int
    cpu: subprocess.Popen
    gpu: subprocess.Popen
    logs: Path
    hooks: list


@pytest.fixture(scope="module")
def team(tmp_path_factory, tiny_model_dir):
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from flows.pools import start_worker
    from flows.server import deploy, free_port, server_env, start_server, stop_process, wait_healthy

    tmp = tmp_path_factory.mktemp("team")
    logs = tmp / "logs"
    logs.mkdir()
    site, root = tmp / "site", tmp / "root"
    shutil.copytree(REPO / "data" / "demo_site", site)
    hook_srv = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=hook_srv.serve_forever, daemon=True).start()
    pools = {"cpu": f"t-cpu-{secrets.token_hex(3)}", "gpu": f"t-gpu-{secrets.token_hex(3)}"}
    config = tiny_dag_config(tmp / "tiny.yaml", root, site, free_port(), tiny_model_dir, pools=pools,
                             notifications={"webhook_block": "t-alerts"})
    auth = f"d2a:{secrets.token_urlsafe(12)}"
    port = free_port()
    base = {**os.environ, "PREFECT_SERVER_API_AUTH_STRING": auth}
    for k in ("PREFECT_API_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_AUTH_STRING"):
        base.pop(k, None)
    env = server_env("127.0.0.1", port, home=tmp / "prefect-home", base=base)
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"  # workers poll fast: a shared 2-core box is slow enough
    env["PREFECT_WORKER_PREFETCH_SECONDS"] = "5"
    server = cpu = gpu = None
    files = [open(logs / n, "w") for n in ("server.log", "deploy.log", "cpu.log", "gpu.log")]
    try:
        server = start_server("127.0.0.1", port, env, files[0])
        wait_healthy(env["PREFECT_API_URL"], timeout=180, proc=server)
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: auth}):
            from prefect.blocks.webhook import Webhook

            Webhook(method="POST", url=f"http://127.0.0.1:{hook_srv.server_address[1]}/hook").save("t-alerts",
                                                                                                   overwrite=True)
            deploy([str(config)], env, files[1])  # `d2a deploy --config ...`
            cpu = start_worker(pools["cpu"], env, files[2], mark="cpu-worker")
            gpu = start_worker(pools["gpu"], {**env, "D2A_NODE_ADDRESS": "127.0.0.1"}, files[3], mark="gpu-worker")
            yield Team(env, env["PREFECT_API_URL"], auth, config, root, site, port, cpu, gpu, logs, Hooks.received)
    finally:
        for p in (gpu, cpu):
            if p is not None:
                stop_process(p, timeout=60)
        if server is not None:
            stop_process(server, timeout=30)
        hook_srv.shutdown()
        for f in files:
            f.close()


# ------------------------------------------------------------------------------------ helpers
def wait_final(fid, timeout: float):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as c:
        while time.monotonic() < deadline:
            fr = c.read_flow_run(fid)
            if fr.state is not None and fr.state.is_final():
                return fr
            time.sleep(2)
    raise TimeoutError(f"flow run {fid} not finished after {timeout:.0f}s")


def wait_for(pred, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := pred():
            return v
        time.sleep(every)
    raise TimeoutError(what)


def artifacts_in(runs, key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in runs])))


def placements(runs, run_name: str = "t") -> dict[str, dict]:
    out = {}
    for a in artifacts_in(runs, f"{run_name}-placement"):
        rows = json.loads(a.data) if isinstance(a.data, str) else a.data
        for r in rows:
            out[r["stage"]] = {**r, "ancestors": [int(x) for x in str(r["ancestors"]).split()]}
    return out


def fail_message(fr) -> str:
    return (fr.state.message or "") if fr.state else ""


# -------------------------------------------------------------------------------------- tests
def test_overrides_allow_list_names_the_refused_key(tmp_path, tiny_model_dir):
    from flows.guard import ParameterRefused, check_overrides

    cfg = tiny_dag_config(tmp_path / "c.yaml", tmp_path / "root", tmp_path / "site", 1, tiny_model_dir)
    check_overrides(str(cfg), ["train.max_steps=3", "train.lr=1e-4", "train.eval_every=2", f"data_root={tmp_path}/root/x"])
    for item, key in [("model.name=evil/repo", "model.name"), ("model.trust_remote_code=true", "model.trust_remote_code"),
                      ("model.tokenizer=x", "model.tokenizer"), ("model.revision=abc", "model.revision"),
                      ("dask.address=tcp://1.2.3.4:8786", "dask.address"), ("train.launcher=torchrun", "train.launcher"),
                      ("train.accelerate_config=/tmp/a.yaml", "train.accelerate_config"),
                      ("train..launcher=torchrun", "train.launcher"), ("data_root=/tmp/elsewhere", "data_root"),
                      ("scrape.sources=/tmp/s.yaml", "scrape.sources"), ("clean.min_chars=1", "clean.min_chars"),
                      ("server.allowed_overrides=[model.name]", "server.allowed_overrides")]:
        with pytest.raises(ParameterRefused, match=re.escape(f"override {key!r} refused")):
            check_overrides(str(cfg), [item])
    # even a config that lists a code-selecting key cannot open it to flow runs
    d = yaml.safe_load(cfg.read_text())
    d["server"] = {"allowed_overrides": ["model.name", "train.max_steps"]}
    cfg.write_text(yaml.safe_dump(d))
    with pytest.raises(ParameterRefused, match="config file on disk"):
        check_overrides(str(cfg), ["model.name=x"])


def test_data_root_lock_is_exclusive_and_names_the_holder(tmp_path, tiny_model_dir):
    from flows.guard import DataRootBusy, data_root_lock
    from tasks.core.config import load_config

    cfg = load_config(tiny_dag_config(tmp_path / "c.yaml", tmp_path / "root", tmp_path / "site", 1, tiny_model_dir))
    # another process holds it (flock is per open file, so a second open in this process would too)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {str(REPO)!r})
from flows.guard import data_root_lock; from tasks.core.config import load_config
with data_root_lock(load_config({str(tmp_path / 'c.yaml')!r})):
    print('held', flush=True); sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataRootBusy, match=f"pid {holder.pid}"):
            with data_root_lock(cfg):
                pass
    finally:
        holder.communicate("", timeout=30)
    with data_root_lock(cfg) as me:  # released with its holder
        assert me["pid"] == os.getpid()
    assert not (cfg.root / ".d2a-run.json").exists()


def test_metrics_follower_reads_only_new_complete_lines(tmp_path):
    from flows.artifacts import MetricsFollower

    m = tmp_path / "metrics.jsonl"
    f = MetricsFollower(m)
    assert f.poll() is None  # no file yet
    m.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert f.poll() == 1 and f.offset == m.stat().st_size
    with open(m, "a") as fh:
        fh.write('ss": 1.9}\n{"step": 2, "eval_loss": 1.8}\n')
    before = f.offset
    assert f.poll() == 2 and f.offset > before  # the partial line completed; eval lines are not steps
    m.write_text('{"step": 1, "loss": 2.1}\n')  # a forced restart replaced the file
    assert f.poll() == 1


def test_deploy_registers_pools_deployments_limits_and_automations(team):
    from prefect.client.orchestration import get_client

    cfg = yaml.safe_load(team.config.read_text())
    with get_client(sync_client=True) as c:
        for pool in cfg["pools"].values():
            assert c.read_work_pool(pool).type == "process"
        deps = {f"{c.read_flow(d.flow_id).name}/{d.name}": d for d in c.read_deployments()}
        gpu = {f"{f}/tiny" for f in ("stage-train", "stage-train-node", "stage-evaluate", "generate")}
        cpu = {f"{f}/tiny" for f in ("data-to-adapter", "stage-scrape", "stage-prepare", "rescrape-and-retrain")}
        assert set(deps) == gpu | cpu
        for n in gpu:
            assert deps[n].work_pool_name == cfg["pools"]["gpu"], n
        for n in cpu:
            assert deps[n].work_pool_name == cfg["pools"]["cpu"], n
        assert deps["data-to-adapter/tiny"].global_concurrency_limit.limit == 1
        assert deps["stage-train/tiny"].global_concurrency_limit.limit == 1
        assert deps["data-to-adapter/tiny"].entrypoint == "flows.pipeline.data_to_adapter"
        names = {a.name for a in c.read_automations()}
    assert {"d2a-t-failures", "d2a-t-promotions"} <= names


def test_unauthenticated_api_call_is_refused(team):
    import base64

    def call(method: str, path: str, auth: str | None):
        h = {"Content-Type": "application/json"}
        if auth:
            h["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        req = urllib.request.Request(f"{team.api}{path}", data=b"{}" if method == "POST" else None, method=method,
                                     headers=h)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert call("GET", "/admin/version", None) == 401
    assert call("GET", "/admin/version", "d2a:wrong") == 401
    assert call("GET", "/admin/version", team.auth) == 200
    assert call("GET", "/health", None) == 200  # probes stay open
    # CSRF protection is on: even with the right credentials a write needs the CSRF token
    assert call("POST", "/deployments/filter", team.auth) == 403


def test_server_refuses_a_public_bind_without_auth(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_API_AUTH")}
    env.update(PREFECT_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "flows.cli", "server", "--host", "0.0.0.0", "--port", "1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "refusing to listen on 0.0.0.0" in r.stderr and "PREFECT_SERVER_API_AUTH_STRING" in r.stderr
    assert not (tmp_path / "prefect.db").exists()  # nothing was started


@pytest.mark.timeout(1200)
def test_dag_on_the_pools_trains_on_the_gpu_worker_and_matches_a_local_run(team, tmp_path):
    """One DAG run through the API; while it holds the data root a second run of the same deployment
    waits for its slot and the rescrape skips. Then: where each stage ran, the artifacts, and the
    adapter against a local run's."""
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    fr = run_deployment("data-to-adapter/tiny", timeout=0)
    holder = team.root / ".d2a-run.json"
    wait_for(lambda: holder.is_file() and json.loads(holder.read_text()).get("flow_run_id") == str(fr.id),
             timeout=300, what="the DAG run never took the data root")
    second = run_deployment("data-to-adapter/tiny", timeout=0)
    resc = wait_final(run_deployment("rescrape-and-retrain/tiny", timeout=0).id, timeout=300)
    assert resc.state.is_completed(), fail_message(resc)
    with get_client(sync_client=True) as c:
        assert not c.read_flow_run(fr.id).state.is_final(), "the DAG ended before the rescrape came: no overlap"
        assert c.read_flow_run(second.id).start_time is None  # waiting for the deployment's slot
    (skip,) = artifacts_in([resc], "t-rescrape-decision")
    assert "Re-scrape skipped" in skip.data and fr.name in skip.data
    fr = wait_final(fr.id, timeout=800)
    assert fr.state.is_completed(), (fail_message(fr), (team.logs / "cpu.log").read_text()[-3000:],
                                     (team.logs / "gpu.log").read_text()[-3000:])
    second = wait_final(second.id, timeout=400)
    assert second.state.is_completed(), fail_message(second)
    assert second.start_time >= fr.end_time  # queued, never interleaved
    runs = run_tree(fr.id)
    flows_run = sorted({r.name for r in runs})
    assert len(runs) >= 4, flows_run  # the DAG, its prepare subflow, stage-train and stage-evaluate
    where = placements(runs)
    assert set(where) == {"scrape", "extract", "prepare", "train", "evaluate"}, where
    cpu_pid, gpu_pid = team.cpu.pid, team.gpu.pid
    report = {"cpu_worker": {"pid": cpu_pid, "cmd": " ".join(psutil.Process(cpu_pid).cmdline()[-6:])},
              "gpu_worker": {"pid": gpu_pid, "cmd": " ".join(psutil.Process(gpu_pid).cmdline()[-6:])},
              "stages": where}
    print("\nprocess trees:\n" + json.dumps(report, indent=1))
    (tmp_path / "placement.json").write_text(json.dumps(report, indent=1))
    for stage, rec in where.items():
        gpu_stage = stage in ("train", "evaluate")
        assert rec["worker_mark"] == ("gpu-worker" if gpu_stage else "cpu-worker"), (stage, rec)
        assert rec["ancestors"][0] == (gpu_pid if gpu_stage else cpu_pid), (stage, rec)  # a child of that worker
        assert (cpu_pid if gpu_stage else gpu_pid) not in rec["ancestors"], (stage, rec)
    assert where["train"]["pid"] != where["scrape"]["pid"]
    # the dashboards are embedded (no file:// link anywhere) and the adapter artifact is a path in the data root
    dash = artifacts_in(runs, "t-dashboard-training")
    assert dash and "data:image/png;base64," in dash[0].data
    for key in ("t-dashboard-evaluation", "t-adapter"):
        (a,) = artifacts_in(runs, key)
        assert "file://" not in str(a.data)
    assert artifacts_in(runs, "t-training-progress")[0].data == 100.0
    # a local run of the same stages (plain functions, `d2a stage`) gives the same adapter, bit for bit
    from flows.cli import _run_stage
    from tasks.core.config import load_config

    local = tmp_path / "local-root"
    for s in ("scrape", "extract", "clean", "split", "mix", "tokenize"):
        _run_stage(s, str(team.config), [f"data_root={local}"])
    m_local = _run_stage("train", str(team.config), [f"data_root={local}"])
    cur = json.loads((team.root / "current.json").read_text())
    a = load_file(Path(cur["adapter"]) / "adapter_model.safetensors")
    b = load_file(Path(m_local["adapter"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Path(cur["run_dir"]).name == Path(m_local["run_dir"]).name  # the same run identity
    assert load_config(team.config).root == team.root


@pytest.mark.timeout(300)
def test_code_selecting_override_is_refused_and_the_failure_posts_to_the_webhook(team):
    from prefect.deployments import run_deployment

    n = len(team.hooks)
    fr = run_deployment("stage-train/tiny", timeout=0, parameters={"overrides": ["model.trust_remote_code=true"]})
    fr = wait_final(fr.id, timeout=240)
    assert fr.state.is_failed()
    assert "model.trust_remote_code" in fail_message(fr) and "config file on disk" in fail_message(fr)
    fr2 = run_deployment("data-to-adapter/tiny", timeout=0, parameters={"config": "configs/demo.yaml"})
    fr2 = wait_final(fr2.id, timeout=240)
    assert fr2.state.is_failed() and "parameter 'config' refused" in fail_message(fr2)
    posted = wait_for(lambda: [h for h in team.hooks[n:] if h.get("flow_run_id") in (str(fr.id), str(fr2.id))],
                      timeout=90, what="no webhook post for the failed runs")
    h = next(p for p in posted if p["flow_run_id"] == str(fr.id))
    assert h["state"] == "Failed" and h["deployment"] == "tiny" and h["kind"] == "flow-run-state"
    assert "model.trust_remote_code" in h["message"] and team.auth not in json.dumps(team.hooks)
    # the DAG test's first adapter was promoted: announced through the promotions automation
    cur = json.loads((team.root / "current.json").read_text())
    promo = wait_for(lambda: [p for p in team.hooks if p.get("kind") == "promotion"], timeout=60,
                     what="no promotion was announced")
    assert cur["run_id"] in {p["run_id"] for p in promo} and all(p["config"] == "t" for p in promo)


@pytest.mark.timeout(600)
def test_two_node_training_as_two_flow_runs_on_the_gpu_pool_matches_one_process(team, tmp_path):
    from prefect.deployments import run_deployment

    from flows.server import deploy
    from tasks.core.config import load_config
    from tasks.train.stage import run_train

    assert list((team.root / "tokenized").glob("*/manifest.json")), "needs the DAG test's tokenized data"
    d = yaml.safe_load(team.config.read_text())
    d["run_name"] = "t2"
    d["train"].update(nnodes=2, launcher="torchrun", micro_batch_size=2)
    two = tmp_path / "twonode.yaml"
    two.write_text(yaml.safe_dump(d, sort_keys=False))
    deploy([str(two)], team.env)
    fr = run_deployment("stage-train/twonode", timeout=0)
    fr = wait_final(fr.id, timeout=500)
    assert fr.state.is_completed(), (fail_message(fr), (team.logs / "gpu.log").read_text()[-4000:])
    runs = run_tree(fr.id)
    where = placements(runs, "t2")
    assert {"train", "train-node-1"} <= set(where), where
    assert where["train"]["pid"] != where["train-node-1"]["pid"]
    assert all(where[k]["ancestors"][0] == team.gpu.pid for k in ("train", "train-node-1"))  # both flow runs: the GPU worker's
    print("\ntwo-node placement:\n" + json.dumps({k: where[k] for k in ("train", "train-node-1")}, indent=1))
    m2 = json.loads((next((team.root / "runs").glob("t2-*/manifest.json"))).read_text())
    assert m2["counts"]["world_size"] == 2
    one = load_config(team.config, ["run_name=t1", "train.micro_batch_size=4"])
    m1 = run_train(one)
    l1 = {r["step"]: r["loss"] for r in read_metrics(m1["run_dir"]) if "loss" in r}
    l2 = {r["step"]: r["loss"] for r in read_metrics(m2["run_dir"]) if "loss" in r}
    assert l1.keys() == l2.keys() == {1, 2, 3, 4}
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=2e-2), (s, l1[s], l2[s])
    a = load_file(Path(m1["adapter"]) / "adapter_model.safetensors")
    b = load_file(Path(m2["adapter"]) / "adapter_model.safetensors")
    for k in a:
        cos = torch.nn.functional.cosine_similarity(a[k].flatten().float(), b[k].flatten().float(), dim=0)
        assert cos > 0.98, (k, float(cos))

