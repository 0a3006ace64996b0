"""The whole ``data-to-adapter`` flow (flows/pipeline.py) end to end in seconds: the bundled demo
website served on loopback, the tiny random Llama and its BPE tokenizer from conftest, rows of 32
tokens and a few optimizer steps, under a temporary Prefect API. Every stage runs for real (the
crawler, the parsers, clean+dedup, split, mix, tokenize, a QLoRA training subprocess, evaluate,
promote); only the sizes are small. test_integration.py does the same with the real SmolLM2 (minutes).

A second run of the same flow must skip every stage whose inputs did not change."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import read_metrics, tiny_config_dict

from scrapers.schema import REPO_ROOT
from tasks.core.config import CATEGORIES

STEPS = 3  # optimizer steps, given as a token budget: the flow must convert it as the worker does


def _write_config(tmp: Path, model_dir: Path) -> Path:
    from flows.server import free_port

    site = tmp / "site"
    shutil.copytree(REPO_ROOT / "data" / "demo_site", site)
    d = tiny_config_dict(tmp / "root", model_dir, train={"max_tokens": STEPS * 2 * 2 * 32, "save_every": 2})
    demo = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
    d["demo_site"] = {"enabled": True, "root": str(site), "port": free_port()}
    # the demo's scrape (loopback allowed), clean (short pages) and split (a salt that leaves every
    # category a held-out page) settings; no politeness delay against our own loopback server
    d["scrape"] = {**demo["scrape"], "min_delay_s": 0}
    d["clean"], d["split"] = demo["clean"], demo["split"]
    d["seed"] = demo["seed"]
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


async def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        fr = await client.read_flow_run(flow_run_id)
        trs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return fr, trs


@pytest.fixture(scope="module")
def dag(tmp_path_factory, tiny_model_dir):
    import torch
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import data_to_adapter

    tmp = tmp_path_factory.mktemp("dag")
    config = _write_config(tmp, tiny_model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # evaluate runs in this process: tiny matrices gain nothing from more (the worker has train.num_threads)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            state = data_to_adapter(config=str(config), return_state=True)
            flow_run, task_runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
            first = state.result()
            again = data_to_adapter(config=str(config))
    finally:
        torch.set_num_threads(threads)
    return tmp / "root", config, first, again, flow_run, task_runs


def _m(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def test_prefect_recorded_the_flow_and_its_stages(dag):
    *_, flow_run, task_runs = dag
    assert flow_run.state.is_completed()
    names = {t.name.rsplit("-", 1)[0] for t in task_runs}
    assert {"scrape", "extract", "train", "evaluate"} <= names  # clean ... tokenize run in the prepare subflow
    assert all(t.state.is_completed() for t in task_runs)


def test_every_stage_wrote_its_manifest(dag):
    root, _, summary, *_ = dag
    (tok_dir,) = [p for p in (root / "tokenized").iterdir() if p.is_dir()]  # beside it: its .lock file
    run = Path(summary["run_dir"])
    stages = {"scrape": root / "raw", "extract": root / "extracted", "clean": root / "clean", "split": root / "split",
              "mix": root / "mix", "tokenize": tok_dir, "train": run}
    for name, d in stages.items():
        m = _m(d)
        assert m["stage"] == name and len(m["fingerprint"]) == 64 and m["files"], name
    assert _m(root / "raw")["counts"]["pages"] > 60  # the whole demo site, robots.txt obeyed
    assert summary["stages"] == {k: "ran" for k in ("scrape", "extract", "clean", "split", "mix", "tokenize",
                                                    "train", "evaluate")}


def test_the_adapter_was_trained_and_promoted(dag):
    root, _, summary, *_ = dag
    adapter = Path(summary["adapter"])
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0 and (adapter / "adapter_config.json").is_file()
    assert json.loads((root / "current.json").read_text())["run_id"] == Path(summary["run_dir"]).name
    assert summary["promoted"] is True


def test_eval_json_has_numbers_per_category(dag):
    _, _, summary, *_ = dag
    report = json.loads(Path(summary["eval_report"]).read_text())
    cats = report["categories"]
    assert set(cats) | set(report["categories_without_heldout"]) == set(CATEGORIES)
    assert len(cats) >= 4  # the demo salt leaves held-out pages in (nearly) every category
    for cat, r in cats.items():
        for side in ("base", "adapter"):
            assert math.isfinite(r[side]["loss"]) and r[side]["tokens"] > 0, (cat, side)
            assert r[side]["ppl"] == pytest.approx(math.exp(r[side]["loss"]))
        assert r["delta_loss"] == pytest.approx(r["adapter"]["loss"] - r["base"]["loss"])
    assert report["samples"][0]["adapter"] is not None


def test_the_flow_plans_the_steps_the_worker_ran(dag):
    """The progress total (flows/pipeline.expected_steps) and the worker use one step plan: a
    token budget becomes STEPS optimizer steps in both (a copy that ignored max_tokens would say
    ~epochs x rows / batch)."""
    from flows.pipeline import expected_steps
    from tasks.core.config import load_config

    root, config, summary, *_ = dag
    (tok_dir,) = [p for p in (root / "tokenized").iterdir() if p.is_dir()]  # beside it: its .lock file
    steps = [r["step"] for r in read_metrics(summary["run_dir"]) if "loss" in r]
    assert steps[-1] == STEPS
    assert expected_steps(load_config(str(config)), _m(tok_dir)) == STEPS
    assert _m(tok_dir)["counts"]["train"]["rows"] > 10 * STEPS * 4  # so the budget, not the data, ended training


def test_a_second_run_skips_every_stage_that_did_not_change(dag):
    _, _, first, again, *_ = dag
    # scrape always runs (conditional requests: 304s), and republishes the same pages
    assert again["stages"] == {"scrape": "ran", **{k: "up to date (skipped)" for k in (
        "extract", "clean", "split", "mix", "tokenize", "train", "evaluate")}}
    assert again["run_dir"] == first["run_dir"] and again["overall_loss"] == first["overall_loss"]


# ------------------------------------------------------------------------- the flows' helpers
def _cfg(tmp_path, **sections):
    from tasks.core.config import config_from_dict

    return config_from_dict(tiny_config_dict(tmp_path, tmp_path, **sections))


def test_expected_steps_follows_nnodes_and_max_tokens(tmp_path):
    from flows.pipeline import expected_steps
    from tasks.train.plan import plan_steps

    tok_m = {"seq_len": 2048, "counts": {"train": {"rows": 1_000_000}}}
    layout = {"num_processes": 8, "nnodes": 4, "rdzv_endpoint": "10.0.0.1:29500", "micro_batch_size": 4,
              "grad_accum": 2, "epochs": 2}
    cfg = _cfg(tmp_path, train=layout)
    assert expected_steps(cfg, tok_m) == plan_steps(cfg.train, 1_000_000, 2048, 32)["total_steps"] == 2 * (
        1_000_000 // 32 // 4 // 2)
    assert expected_steps(_cfg(tmp_path, train={**layout, "max_tokens": 10**9}), tok_m) == math.ceil(
        10**9 / (4 * 2 * 32 * 2048))
    assert expected_steps(_cfg(tmp_path, train={**layout, "max_steps": 7}), tok_m) == 7
    assert expected_steps(_cfg(tmp_path, train={**layout, "max_steps": 7}), {}) == 7  # before tokenize
    assert expected_steps(cfg, {}) is None
    assert expected_steps(cfg, {"counts": {"train": {"rows": 3}}}) is None  # not one step: the worker says why


def test_continue_from_previous_starts_from_the_current_adapter(tmp_path):
    from flows.rescrape import warm_start
    from tasks.core.config import config_from_dict

    cfg = _cfg(tmp_path, schedule={"continue_from_previous": True})
    d = cfg.model_dump(mode="json")
    cur = {"adapter": "data/runs/a/adapter", "run_id": "a", "run_dir": str(tmp_path / "runs" / "a")}
    assert warm_start(cfg, d, cur) == "from the current adapter a"  # no revision recorded: continues
    assert config_from_dict(d).train.init_adapter == "data/runs/a/adapter"
    d = cfg.model_dump(mode="json")
    assert warm_start(cfg, d, None).startswith("from scratch") and d["train"]["init_adapter"] is None
    # the current adapter was trained on another base revision: a new base was pinned, start over
    (tmp_path / "runs" / "a" / "adapter").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "adapter" / "quantization.json").write_text(json.dumps({"base_revision": "rev-old"}))
    d = cfg.model_dump(mode="json")
    why = warm_start(cfg, d, cur)
    assert why.startswith("from scratch") and "rev-old" in why and d["train"]["init_adapter"] is None
    from tasks.core.model import base_revision

    (tmp_path / "runs" / "a" / "adapter" / "quantization.json").write_text(
        json.dumps({"base_revision": base_revision(cfg.model)}))
    assert warm_start(cfg, cfg.model_dump(mode="json"), cur) == "from the current adapter a"
