"""Scheduled re-scrape-and-retrain: the schedule comes from the config; an unchanged site is
re-scraped with conditional requests and nothing is retrained; enough changes retrain, and the new
adapter is promoted only when it is not worse than the current one (else the old one is kept, and
the run says why). The promotion/drift logic is also tested as plain functions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_server import clone, prepared_root, write_config

from tasks.adapter.promote import corpus_drift, decide


# --------------------------------------------------------------------------- plain functions
def test_decide_promotes_only_when_no_category_is_worse_beyond_tolerance():
    cur = {"recipes": 2.0, "code": 3.0, "articles": 2.5}
    better = decide({"recipes": 1.9, "code": 2.95, "articles": 2.5}, cur, tolerance=0.01)
    assert better.promote and "promoted" in better.reasons[0]
    within = decide({"recipes": 1.5, "code": 3.005, "articles": 2.4}, cur, tolerance=0.01)
    assert within.promote
    worse = decide({"recipes": 1.5, "code": 3.2, "articles": 2.4}, cur, tolerance=0.01)
    assert not worse.promote and "code" in worse.reasons[0] and "recipes" not in worse.reasons[0]
    assert [r["verdict"] for r in worse.rows] == ["ok", "worse", "ok"]
    must_improve = decide({"recipes": 1.99, "code": 2.99, "articles": 2.49}, cur, tolerance=-0.05)
    assert not must_improve.promote
    assert decide({"recipes": 5.0}, None, 0.0).promote  # the first adapter
    only_new = decide({"code": 1.0}, {"recipes": 2.0}, 0.0)
    assert not only_new.promote and "cannot compare" in only_new.reasons[0]


def test_corpus_drift_counts_new_changed_gone():
    old = {"a": "1", "b": "2", "c": "3", "d": "4"}
    d = corpus_drift(old, {"a": "1", "b": "X", "c": "3", "e": "5"})
    assert (d.new, d.changed, d.gone, d.unchanged) == (1, 1, 1, 2)
    assert d.fraction == pytest.approx(3 / 5)
    assert corpus_drift(old, dict(old)).fraction == 0.0


# ------------------------------------------------------------------------------ the schedule
def test_schedule_is_the_configured_cron(tmp_path):
    from flows.deployments import build_deployments

    cfg = write_config(tmp_path / "sched.yaml", tmp_path / "root", tmp_path / "site", 0,
                       schedule={"cron": "15 4 * * 2", "timezone": "Europe/Paris", "change_threshold": 0.2})
    deps = {d.flow_name: d for d in build_deployments(str(cfg))}
    (s,) = deps["rescrape-and-retrain"].schedules
    assert (s.schedule.cron, s.schedule.timezone, s.active) == ("15 4 * * 2", "Europe/Paris", True)
    assert all(not deps[f].schedules for f in deps if f != "rescrape-and-retrain")
    assert "20%" in deps["rescrape-and-retrain"].description


# ------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A clone of the prepared data root (its adapter current) and of its demo site, and a Prefect API."""
    from prefect.testing.utilities import prefect_test_harness

    p = clone(prepared_root(tmp_path_factory), tmp_path_factory.mktemp("rescrape"))
    config = write_config(p.root.parent / "resc.yaml", p.root, p.site, p.port)
    with prefect_test_harness(server_startup_timeout=120):
        yield p, config


def _current(root: Path) -> dict:
    return json.loads((root / "current.json").read_text())


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_unchanged_site_is_rescraped_conditionally_and_nothing_is_retrained(world):
    from flows.rescrape import rescrape_and_retrain

    p, config = world
    before = _current(p.root)
    runs_before = sorted(d.name for d in (p.root / "runs").iterdir())
    out = rescrape_and_retrain(config=str(config))
    assert out["retrained"] is False and "kept adapter" in out["reason"]
    assert out["drift"]["fraction"] == 0.0
    assert out["scrape"]["not_modified"] > 0 and out["scrape"]["changed"] == 0  # conditional requests: 304s
    assert sorted(d.name for d in (p.root / "runs").iterdir()) == runs_before
    assert _current(p.root) == before


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_enough_changes_retrain_and_only_a_not_worse_adapter_is_promoted(world):
    from flows.rescrape import rescrape_and_retrain
    from tasks.adapter.promote import run_promote
    from tasks.core.config import load_config

    p, config = world
    before = _current(p.root)
    # edit every recipe page (~20% of the site): new text in each
    edited = 0
    for f in sorted((p.site / "recipes").glob("*.html")):
        if f.name == "index.html":
            continue
        html = f.read_text(encoding="utf-8", errors="surrogateescape")
        extra = ("<p>Kitchen note: toast the spices in a dry pan for a minute, then bloom them in warm oil; "
                 "season at the end and taste again before serving.</p>")
        new = re.sub(r"</body>", extra + "</body>", html, count=1, flags=re.I)
        if new != html:
            f.write_text(new, encoding="utf-8", errors="surrogateescape")
            edited += 1
    assert edited >= 5
    # a tolerance no adapter can meet: it trains and evaluates, but the old adapter stays current
    out = rescrape_and_retrain(config=str(config), overrides=["schedule.promote_tolerance=-100"])
    assert out["retrained"] is True and out["drift"]["changed"] >= edited - 1 and out["drift"]["fraction"] > 0.05
    assert out["scrape"]["changed"] >= edited - 1
    assert out["promoted"] is False
    assert any("kept the current adapter" in r for r in out["promotion_reasons"])
    new_run = Path(out["run_dir"])
    assert new_run.name != before["run_id"] and (new_run / "adapter" / "adapter_model.safetensors").is_file()
    assert _current(p.root)["run_id"] == before["run_id"]
    promo = json.loads((new_run / "promotion.json").read_text())
    assert promo["same_rows"] and set(promo["current_losses"]) == set(promo["candidate_losses"])
    history = [json.loads(x) for x in (p.root / "promotions.jsonl").read_text().splitlines()]
    assert history[-1]["run_id"] == new_run.name and history[-1]["promoted"] is False
    # the same candidate under a tolerance it meets is promoted (the current adapter's losses on the
    # candidate's rows are reused, not measured again)
    res = run_promote(load_config(config, ["schedule.promote_tolerance=100"]), new_run)
    assert res["promoted"] is True and res["current_losses"] == promo["current_losses"]
    assert _current(p.root)["run_id"] == new_run.name
    # and the next scheduled run compares with the new current adapter's corpus: nothing to do
    again = rescrape_and_retrain(config=str(config))
    assert again["retrained"] is False and again["drift"]["fraction"] == 0.0
