"""`d2a plan`: the demo config's plan has the recorded demo run's figures; the production plan prints
device-hours from the recorded throughput; unreachable shares and sources that can never yield a page are
warnings; and on a real (tiny-model) run the plan made after the scrape agrees with what the run then does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config_dict

from flows.plan import load_results, make_plan, run_plan
from tasks.core.config import load_config
from tasks.train.plan import plan_steps


def _recorded(cfg):
    return next(m for m in load_results(cfg)["throughput"] if m["model"] == cfg.model.name
                and m["device"] == cfg.plan.device)


def test_demo_plan_has_the_demo_runs_figures(tmp_path):
    cfg = load_config("configs/demo.yaml", [f"data_root={tmp_path}"])
    p = run_plan(cfg)
    assert p["phase"] == "before the first scrape" and p["warnings"] == []
    assert {s["id"]: s["expected_pages"] for s in p["sources"]} == cfg.plan.expected_pages
    for c, v in p["categories"].items():
        assert v["corpus_tokens"] == int(v["expected_pages"] * cfg.plan.tokens_per_page[c])
        assert v["mixed_share"] == pytest.approx(cfg.mix.ratios[c], abs=0.002) and "cannot_reach" not in v
    t = p["training"]
    want = plan_steps(cfg.train, t["rows"], cfg.tokenize.seq_len, 1)
    assert (t["steps"], t["tokens"]) == (want["total_steps"], want["total_steps"] * 4096)
    # the demo run (README "Results"; re-measured 2026-12-04: 32,754 tokens mixed, 64 rows): 16 steps of 4,096
    assert t["steps"] == 16 and p["mixture"]["mixed_tokens"] == pytest.approx(32_754, rel=0.05)
    assert t["rows"] == pytest.approx(64, abs=2)
    tp = _recorded(cfg)
    assert t["throughput"]["tokens_per_s"] == tp["tokens_per_s"]
    assert t["device_hours"] == pytest.approx(t["tokens"] / tp["tokens_per_s"] / 3600, abs=0.01)
    ck = p["checkpoints"]
    assert ck["trainable_params"] == 2_580_480 and ck["steps"] == [8, 16] and ck["kept_at_most"] == 2
    assert ck["bytes_each"] == int(2_580_480 * load_results(cfg)["disk"]["bytes_per_trainable_param"]["checkpoint"])
    assert set(p["disk"]) >= {"raw", "clean", "tokenized", "checkpoints", "total"}
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["training"]["steps"] == 16 and "## Tokens per category" in (tmp_path / "plan.md").read_text()


def test_production_plan_prints_device_hours_from_the_recorded_throughput(tmp_path, capsys):
    from flows.cli import main

    assert main(["plan", "--config", "configs/mistral-small-24b.yaml", f"data_root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    cfg = load_config("configs/mistral-small-24b.yaml", [f"data_root={tmp_path}"])
    p = json.loads((tmp_path / "plan.json").read_text())
    tp = _recorded(cfg)
    hours = p["training"]["tokens"] / tp["tokens_per_s"] / 3600
    assert tp["operating_point"] == "speed" and p["training"]["throughput"]["tokens_per_s"] == tp["tokens_per_s"]
    assert f"**{hours:,.2f} H200 device-hours**" in out
    # the seed's 56B-token corpus, 90% for training, 2 epochs (100.8B) is cut by the declared budget:
    # train.max_tokens = 56B, whole optimizer steps
    assert cfg.train.max_tokens == 56e9 and 2 * 0.9 * 56e9 > cfg.train.max_tokens
    assert p["training"]["tokens"] == pytest.approx(56e9, rel=1e-3)
    assert any("model.revision is not set" in w for w in p["warnings"])
    assert any("openfoodfacts-dump" in w and "can never yield a page" in w for w in p["warnings"])
    # another operating point has no measurement: said so, no made-up hours
    p2 = make_plan(load_config("configs/mistral-small-24b.yaml", [f"data_root={tmp_path}", "train.micro_batch_size=2"]))
    assert "device_hours" not in p2["training"] and any("no recorded throughput" in w for w in p2["warnings"])


def test_unreachable_share_and_dead_source_are_warnings(tmp_path):
    src = yaml.safe_load(Path("configs/sources/demo.yaml").read_text())
    src["sources"].append({"id": "dump", "kind": "dataset", "category": "code", "path": str(tmp_path / "nope.jsonl"),
                           "permission": src["sources"][0]["permission"]})
    (tmp_path / "sources.yaml").write_text(yaml.safe_dump(src))
    cfg = load_config("configs/demo.yaml", [f"data_root={tmp_path / 'root'}", f"scrape.sources={tmp_path / 'sources.yaml'}",
                                            "mix.max_repeat=1", "mix.total_tokens=30000",
                                            "plan.tokens_per_page.chemical_additives=1"])
    p = make_plan(cfg)
    short = p["categories"]["chemical_additives"]
    assert "max_repeat 1" in short["cannot_reach"] and short["shortfall"] > 0
    assert any(w.startswith("category chemical_additives cannot reach its 1% share") for w in p["warnings"])
    assert any(w.startswith("source dump (code) can never yield a page: dataset file") for w in p["warnings"])


# ----------------------------------------------------------------------------- against a run
@pytest.mark.timeout(1200)
def test_plan_after_the_scrape_agrees_with_the_run(tmp_path, tiny_model_dir):
    """The demo site through every data stage with the tiny model; the plan made then (real pages,
    tokens per page measured on this root) must predict the run: steps and training tokens exactly,
    tokens per category within 10% or 500 tokens (the mix selects whole documents: one demo article is
    ~5% of its category's budget here, and an up-sampled small category lands a document short of its
    target), the checkpoints kept among the
    planned ones, the tokenized shards' size within 25%."""
    from flows.cli import _run_stage

    root = tmp_path / "root"
    d = tiny_config_dict(root, tiny_model_dir, demo_site={"enabled": True, "port": 0},
                         scrape={"allow_private_addresses": ["127.0.0.1"], "min_delay_s": 0},
                         split={"salt": "demo-1067"}, tokenize={"seq_len": 128, "rows_per_shard": 256},
                         train={"micro_batch_size": 8, "grad_accum": 4, "epochs": 1, "save_every": 4,
                                "eval_every": 1000, "keep_checkpoints": 2},
                         schedule={"general_set": None})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(d))
    for stage in ("scrape", "extract", "clean", "split", "mix", "tokenize"):
        _run_stage(stage, str(config), [])
    cfg = load_config(config)
    p = run_plan(cfg)
    assert p["phase"] == "with the last scrape's page counts"
    m = _run_stage("train", str(config), [])
    run = Path(m["run_dir"])
    tok_m = json.loads(next((root / "tokenized").glob("*/manifest.json")).read_text())["counts"]["train"]
    t = p["training"]
    assert t["steps"] == m["counts"]["steps"] and t["tokens"] == m["counts"]["tokens_seen"]
    assert t["rows"] == pytest.approx(tok_m["rows"], rel=0.02)
    for c, n in tok_m["tokens_per_category"].items():
        assert abs(p["categories"][c]["mixed_tokens"] - n) <= max(0.10 * n, 500), c
    kept = sorted(int(x.name.split("-")[1]) for x in (run / "checkpoints").glob("step-*"))
    assert kept and set(kept) <= set(p["checkpoints"]["steps"]) and len(kept) <= p["checkpoints"]["kept_at_most"]
    assert kept[-1] == t["steps"] and p["checkpoints"]["written"] == math.ceil(t["steps"] / 4)
    size = sum(f.stat().st_size for f in (root / "tokenized").rglob("shard-*.arrow"))
    assert p["disk"]["tokenized"]["bytes"] == pytest.approx(size, rel=0.25)
