"""Skip what is unchanged: stage results are keyed by the fingerprints of their inputs, config and
code (the manifests), not by Prefect's per-run cache. Re-running the DAG on unchanged inputs skips
every stage but the scrape; changing one input re-runs only what depends on it; ``force`` re-runs
a stage whatever its fingerprint says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_server import clone, prepared_root, write_config

pytestmark = pytest.mark.integration  # the real SmolLM2 through the whole DAG (CPU, minutes)


def _created(d: Path) -> str:
    return json.loads((d / "manifest.json").read_text())["created_at"] + "|" + \
        str((d / "manifest.json").stat().st_mtime_ns)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    p = clone(prepared_root(tmp_path_factory), tmp_path_factory.mktemp("cache"))
    return p, write_config(p.root.parent / "cache.yaml", p.root, p.site, p.port)


@pytest.mark.timeout(900)
def test_rerun_on_unchanged_inputs_skips_every_stage_but_the_scrape(world):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import data_to_adapter

    p, config = world
    root = p.root
    (tok,) = [p for p in (root / "tokenized").iterdir() if p.is_dir()]  # not its .lock
    (run,) = [d for d in (root / "runs").iterdir() if d.is_dir()]
    dirs = [root / "extracted", root / "clean", root / "split", root / "mix", tok, run]
    before = {d: _created(d) for d in dirs}
    eval_before = (run / "eval.json").read_bytes()
    with prefect_test_harness(server_startup_timeout=120):
        state = data_to_adapter(config=str(config), return_state=True)
        summary = state.result()

        async def task_runs():
            async with get_client() as c:
                return await c.read_task_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))

        trs = asyncio.run(task_runs())
    assert summary["stages"]["scrape"] == "ran"
    assert {k: v for k, v in summary["stages"].items() if k != "scrape"} == \
        dict.fromkeys(("extract", "clean", "split", "mix", "tokenize", "train", "evaluate"), "up to date (skipped)")
    assert {d: _created(d) for d in dirs} == before  # manifests untouched
    assert (run / "eval.json").read_bytes() == eval_before
    assert summary["run_dir"] == str(run) and summary["promoted"] is True  # the same adapter stays current
    # the tasks did run (and found their manifests up to date): Prefect's cache did not short-cut them
    names = {t.name.rsplit("-", 1)[0]: t for t in trs}
    assert {"scrape", "extract", "train", "evaluate"} <= set(names)
    assert all(t.state.is_completed() and t.state.name != "Cached" for t in trs)


def test_changing_one_input_reruns_only_what_depends_on_it(world):
    from tasks.clean.stage import run_clean
    from tasks.core.config import load_config
    from tasks.extract import run_extract
    from tasks.mix import run_mix
    from tasks.split import run_split
    from tasks.tokenize.stage import run_tokenize
    from tasks.train.stage import train_stage

    p, config = world
    root = p.root
    cfg = load_config(config)
    trained = train_stage(cfg)[0]
    assert trained.up_to_date() is not None  # trained on the current shards
    # a tokenize setting: extract, clean, split and mix stay; tokenize re-runs; train would re-run
    cfg2 = load_config(config, ["tokenize.rows_per_shard=16"])
    before = {s: _created(root / d) for s, d in (("extract", "extracted"), ("clean", "clean"), ("split", "split"),
                                                  ("mix", "mix"))}
    ran = {s: fn(cfg2)["created_at"] for s, fn in (("extract", run_extract), ("clean", run_clean),
                                                    ("split", run_split), ("mix", run_mix))}
    assert {s: _created(root / d) for s, d in (("extract", "extracted"), ("clean", "clean"), ("split", "split"),
                                               ("mix", "mix"))} == before
    assert all(before[s].startswith(ran[s]) for s in ran)
    tok_before = json.loads(next((root / "tokenized").glob("*/manifest.json")).read_text())
    tok_after = run_tokenize(cfg2)
    assert tok_after["fingerprint"] != tok_before["fingerprint"]
    assert tok_after["config"]["rows_per_shard"] == 16
    assert train_stage(cfg2)[0].up_to_date() is None  # new data fingerprint -> a new training run
    assert train_stage(cfg2)[0].out_dir != trained.out_dir


def test_force_reruns_exactly_the_named_stages(world):
    from flows.pipeline import expand_force, invalidate
    from tasks.core.config import load_config
    from tasks.mix import run_mix
    from tasks.split import run_split

    p, config = world
    root = p.root
    assert expand_force(["prepare"]) == {"clean", "split", "mix", "tokenize"}
    assert expand_force(["all"]) >= {"scrape", "train", "evaluate"}
    with pytest.raises(ValueError, match="unknown stage"):
        expand_force(["nope"])
    cfg = load_config(config, ["tokenize.rows_per_shard=16"])
    split_before, mix_before = _created(root / "split"), _created(root / "mix")
    removed = invalidate(cfg, expand_force(["split"]))
    assert removed == [str(root / "split" / "manifest.json")]
    run_split(cfg)
    assert _created(root / "split") != split_before  # it ran again
    # split re-ran with the same inputs, so its fingerprint and mix's inputs are unchanged: mix skips
    assert run_mix(cfg)["created_at"] == json.loads((root / "mix" / "manifest.json").read_text())["created_at"]
    assert _created(root / "mix") == mix_before


def test_forced_mix_and_tokenize_encode_nothing_again(world):
    """The token cache outlives the stage outputs: re-running mix and tokenize (forced) on the real
    tokenizer reads every document's ids back, encodes none, and writes the same shards."""
    from flows.pipeline import invalidate
    from tasks.core.config import load_config
    from tasks.mix import run_mix
    from tasks.tokenize.cache import Encoder
    from tasks.tokenize.stage import run_tokenize

    p, config = world
    cfg = load_config(config)
    run_mix(cfg)
    before = run_tokenize(cfg)  # up to date for this config (or made so)
    out = p.root / "tokenized" / before["tokenizer_fingerprint"][:16]
    stamps = _created(p.root / "mix"), _created(out)
    assert len(invalidate(cfg, {"mix", "tokenize"})) == 2
    n0 = Encoder.texts_encoded
    mix_m = run_mix(cfg)
    after = run_tokenize(cfg)
    assert Encoder.texts_encoded == n0
    assert mix_m["token_cache"]["encoded"] == 0 and mix_m["token_cache"]["cached"] > 0
    assert after["token_cache"]["encoded"] == 0 and after["token_cache"]["cached"] > 0
    assert _created(p.root / "mix") != stamps[0] and _created(out) != stamps[1]  # both ran again
    assert after["files"] == before["files"]
