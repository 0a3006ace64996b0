"""The UI path, in a real headless Chromium (Debian's ``chromium``, driven by Playwright with
``executable_path``; never a downloaded browser): open the ``data-to-adapter`` deployment, Run ->
Quick run, see the run created, and poll the API until it completes. The server is what ``d2a server``
runs: the deployments on a CPU and a GPU work pool, a process worker per pool; the quick run goes to
the CPU pool and hands train and evaluate to the GPU pool.

The data root is a clone of a prepared one, so the quick run (the deployment's default parameters)
finds every stage up to date except the scrape: the point here is the UI trigger, not training."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from test_server import artifacts_of, clone, prepared_root, run_tree, served, wait_final, write_config

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.integration  # the real SmolLM2 through the whole DAG (CPU, minutes)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    if not CHROMIUM.exists():  # part of the test environment, as CI installs it: absent fails, never skips
        pytest.fail("Debian's chromium is not installed at /usr/bin/chromium: apt-get install -y chromium "
                    "(.ci/run installs it)", pytrace=False)
    p = clone(prepared_root(tmp_path_factory), tmp_path_factory.mktemp("ui"))
    config = write_config(p.root.parent / "uidemo.yaml", p.root, p.site, p.port)
    with served(p.root.parent, config, p.root) as s:
        yield s


@pytest.mark.timeout(900)
def test_quick_run_from_the_ui_completes(ui_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    s = ui_server
    with get_client(sync_client=True) as c:
        (dep,) = [d for d in c.read_deployments() if c.read_flow(d.flow_id).name == "data-to-adapter"]
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-background-networking", "--disable-gpu",
                                           "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)  # a shared CPU: the UI may take a while to render
            # the deployments list, then the deployment's own page
            page.goto(f"{s.ui}/deployments")
            expect(page.get_by_text("data-to-adapter").first).to_be_visible()
            page.goto(f"{s.ui}/deployments/deployment/{dep.id}")
            expect(page.get_by_text(s.name).first).to_be_visible()
            page.screenshot(path=str(shots / "1-deployment.png"), full_page=True)
            page.get_by_role("button", name=re.compile(r"^\s*Run\b")).first.click()
            page.get_by_text("Quick run", exact=True).click()
            page.screenshot(path=str(shots / "2-quick-run.png"), full_page=True)
            deadline = time.monotonic() + 60
            runs = []
            while not runs and time.monotonic() < deadline:
                with get_client(sync_client=True) as c:
                    runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
                time.sleep(1)
            assert len(runs) == 1, "the quick run did not create exactly one flow run"
            # the deployment's page shows the new run (as "Next Run" or in its run list)
            expect(page.get_by_role("link", name=runs[0].name).first).to_be_visible()
            fr = wait_final(runs[0].id, timeout=780)
            assert fr.state.is_completed(), (fr.state, (s.logs / "serve.log").read_text()[-4000:])
            assert fr.parameters == {"config": str(s.config)}
            page.goto(f"{s.ui}/runs/flow-run/{fr.id}")
            expect(page.get_by_text(fr.name).first).to_be_visible()
            expect(page.get_by_text("Completed").first).to_be_visible()
            page.screenshot(path=str(shots / "3-completed-run.png"), full_page=True)
        finally:
            browser.close()
    # the DAG ran on the CPU pool and handed train and evaluate to the GPU pool's worker
    with get_client(sync_client=True) as c:
        pools = {c.read_flow(r.flow_id).name: r.work_pool_name for r in run_tree(fr.id) if r.deployment_id}
    assert pools == {"data-to-adapter": "d2a-cpu", "stage-train": "d2a-gpu", "stage-evaluate": "d2a-gpu"}, pools
    arts = artifacts_of(fr.id)
    assert {"demo-scrape-report", "demo-stages", "demo-eval-base-vs-adapter"} <= set(arts)
    stages = arts["demo-stages"][0].data
    assert "up to date" in str(stages)  # unchanged inputs: skipped by fingerprint
    assert all((shots / n).stat().st_size > 10_000 for n in ("1-deployment.png", "2-quick-run.png", "3-completed-run.png"))
