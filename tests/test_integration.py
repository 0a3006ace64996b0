"""The whole data-to-adapter flow on the demo config, with the real SmolLM2-135M-Instruct, on CPU.

Serves the bundled demo website itself (so the test can read the server's own request log), runs
the Prefect flow against a temporary Prefect API, and checks the artifact contract end to end."""

import asyncio
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from scrapers.schema import REPO_ROOT as REPO
from scrapers.testsite import serve_site

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import data_to_adapter

    root = tmp_path_factory.mktemp("demo")
    with serve_site(REPO / "data" / "demo_site") as site, prefect_test_harness(server_startup_timeout=120):
        old = os.environ.get("DEMO_SITE")
        os.environ["DEMO_SITE"] = site.url
        try:
            state = data_to_adapter(config="configs/demo.yaml",
                                    overrides=[f"data_root={root}", "demo_site.enabled=false"], return_state=True)
            runs = asyncio.run(_flow_and_task_runs(state.state_details.flow_run_id))
        finally:
            if old is None:
                os.environ.pop("DEMO_SITE", None)
            else:
                os.environ["DEMO_SITE"] = old
        return root, state.result(), site.requests.paths(), runs


async def _flow_and_task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        fr = await client.read_flow_run(flow_run_id)
        trs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return fr, trs


def _m(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_prefect_recorded_the_flow_and_every_stage(demo_run):
    _, _, _, (flow_run, task_runs) = demo_run
    assert flow_run.state.is_completed()
    names = {t.name.rsplit("-", 1)[0] for t in task_runs}
    # the prepare subflow's tasks belong to the subflow run; the parent records the subflow itself
    assert {"scrape", "extract", "train", "evaluate"} <= names
    assert all(t.state.is_completed() for t in task_runs)


def test_no_disallowed_page_was_requested(demo_run):
    root, _, paths, _ = demo_run
    assert "/robots.txt" in paths
    disallowed = [p for p in paths if (p.startswith("/private/") or p.startswith("/drafts/"))
                  and p != "/drafts/public-preview.html"]
    assert disallowed == []
    log = [json.loads(line) for line in (root / "raw" / "fetch_log.jsonl").read_text().splitlines()]
    assert sum(r["decision"] == "refused_robots" for r in log) >= 4  # discovered, refused, never fetched
    for f in (root / "raw").glob("*/pages.parquet"):
        assert all(b"DISALLOWED-CONTENT-MARKER" not in b for b in pq.read_table(f, columns=["body"])["body"].to_pylist())


def test_every_manifest_exists_and_counts_add_up(demo_run):
    root, summary, _, _ = demo_run
    raw, ext, cln, spl, mix = (_m(root / d) for d in ("raw", "extracted", "clean", "split", "mix"))
    (tok_dir,) = [p for p in (root / "tokenized").iterdir() if p.is_dir()]  # not its .lock
    tok = _m(tok_dir)
    run = Path(summary["run_dir"])
    train = _m(run)
    assert ext["counts"]["documents_in"] == raw["counts"]["pages"] == ext["counts"]["kept"] + ext["counts"]["rejected"]
    assert cln["counts"]["documents_in"] == ext["counts"]["kept"] == cln["counts"]["kept"] + cln["counts"]["rejected"]
    assert cln["counts"]["rejects_by_reason"].get("exact_duplicate") == 1  # the reprinted article
    assert cln["counts"]["rejects_by_reason"].get("near_duplicate") == 1  # the edited lentil soup
    assert spl["counts"]["train"]["total"]["docs"] + spl["counts"]["eval"]["total"]["docs"] == cln["counts"]["rows_out"]
    # every category has held-out documents and got training tokens close to its target share
    assert set(tok["counts"]["eval"]) == set(mix["counts"]["categories"]) and len(tok["counts"]["eval"]) == 6
    for cat, c in mix["counts"]["categories"].items():
        assert abs(c["achieved_share"] - c["target_share"]) < 0.03, cat
    assert tok["counts"]["train"]["tokens"] == mix["counts"]["total"]["selected_tokens"]
    # stage chain: each manifest names its input's fingerprint
    assert ext["inputs"]["pages"] == raw["inputs"]["pages"]  # content-keyed: an unchanged site skips extract
    assert cln["inputs"]["extracted"] == ext["fingerprint"] and spl["inputs"]["clean"] == cln["fingerprint"]
    assert train["inputs"]["tokenized"] == tok["fingerprint"]
    assert train["counts"]["steps"] > 0 and (run / "config.yaml").is_file()


def test_adapter_beats_base_on_held_out_data(demo_run):
    _, summary, _, _ = demo_run
    report = json.loads(Path(summary["eval_report"]).read_text())
    assert len(report["categories"]) == 6
    for cat, r in report["categories"].items():
        assert r["adapter"]["loss"] < r["base"]["loss"], cat
    assert report["overall"]["adapter"]["loss"] < report["overall"]["base"]["loss"]
    assert report["samples"][0]["adapter"].strip()
    for png in report["dashboards"].values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_loads_with_plain_peft(demo_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, summary, _, _ = demo_run
    base_dir = json.loads((Path(summary["adapter"]) / "quantization.json").read_text())["base_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), summary["adapter"])
    tok = AutoTokenizer.from_pretrained(summary["adapter"])
    with torch.no_grad():
        out = model(**tok("Red lentil soup", return_tensors="pt"))
    assert torch.isfinite(out.logits).all()
    # and through the product's loader it reproduces the held-out losses the worker measured at its last step
    from test_train import assert_reproduces_trained_model

    assert_reproduces_trained_model(Path(summary["run_dir"]))
