"""The Dask path gives the same bytes as the local path (a real distributed LocalCluster, small).

clean, split, mix and tokenize run once in this process and once with their per-batch work on a
2-worker x 1-thread LocalCluster (threads, not processes: this machine is small and shared; the
code path, task graph and serialization boundary are the same); every file each stage wrote must
have the same sha256. A second test runs the ``prepare`` flow itself on prefect-dask's
DaskTaskRunner and compares it with the local result.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config_dict
from test_clean import FOOTER, corpus, doc, words, write_extracted

from tasks.core.config import config_from_dict


def _extracted(root: Path) -> None:
    rows, _ = corpus(seed=3)
    rng = random.Random(9)
    rows += [doc(f"more-{i:03d}", cat, f"{words(rng, 150)}\n\n{FOOTER}\n")
             for i, cat in enumerate(["recipes", "product_compositions", "chemical_additives", "code"] * 6)]
    write_extracted(root, rows)


def _cfg(root: Path, model_dir: Path, **extra):
    return config_from_dict(tiny_config_dict(root, model_dir, clean={"min_chars": 50, "max_chars": 1500},
                                             split={"eval_fraction": 0.3},
                                             tokenize={"seq_len": 32, "rows_per_shard": 8, "batch_docs": 4,
                                                       "shuffle_bucket_rows": 16}, **extra))


def _files(m: dict) -> dict[str, str]:
    return m["files"]


def _run_local(root: Path, model_dir: Path) -> dict[str, dict]:
    from tasks.clean.stage import run_clean
    from tasks.mix import run_mix
    from tasks.split import run_split
    from tasks.tokenize.stage import run_tokenize

    cfg = _cfg(root, model_dir)
    return {"clean": run_clean(cfg), "split": run_split(cfg), "mix": run_mix(cfg), "tokenize": run_tokenize(cfg)}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("local")
    _extracted(root)
    return root, _run_local(root, tiny_model_dir)


def _same(a: dict[str, dict], b: dict[str, dict]) -> None:
    for stage in ("clean", "split", "mix", "tokenize"):
        fa = {k: v for k, v in _files(a[stage]).items() if k != "config.yaml"}  # holds the data_root
        fb = {k: v for k, v in _files(b[stage]).items() if k != "config.yaml"}
        assert fa == fb, stage
        assert a[stage]["fingerprint"] != "" and a[stage]["counts"] == b[stage]["counts"], stage


def test_dask_executor_gives_identical_outputs(tmp_path, tiny_model_dir, local_run):
    from distributed import Client, LocalCluster, get_task_stream

    from tasks.clean.stage import run_clean
    from tasks.mix import run_mix
    from tasks.split import run_split
    from tasks.tokenize.stage import run_tokenize

    _, want = local_run
    _extracted(tmp_path)
    cfg = _cfg(tmp_path, tiny_model_dir)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with get_task_stream(client) as ts:
            got = {"clean": run_clean(cfg, executor=client), "split": run_split(cfg),
                   "mix": run_mix(cfg, executor=client), "tokenize": run_tokenize(cfg, executor=client)}
        names = {t["key"].split("-")[0] for t in ts.data}
    assert {"_clean_batch", "count_job", "encode_job"} <= names  # the batches really ran on the cluster workers
    assert want["tokenize"]["counts"]["train"]["rows"] > 8  # more than one shard, so the shuffle mixes shards
    _same(want, got)


def test_prepare_flow_on_dask_task_runner_equals_local(tmp_path, tiny_model_dir, local_run):
    from prefect.testing.utilities import prefect_test_harness

    from flows.prepare import run_prepare

    _, want = local_run
    _extracted(tmp_path)
    cfg = _cfg(tmp_path, tiny_model_dir,
               dask={"address": "local", "n_workers": 2, "threads_per_worker": 1, "processes": False})
    with prefect_test_harness(server_startup_timeout=120):
        got = run_prepare(cfg)
    _same(want, got)
    shutil.rmtree(tmp_path / "tokenized", ignore_errors=True)


@pytest.fixture(scope="module")
def demo_pages(tmp_path_factory) -> tuple[Path, dict]:
    """The demo site's pages scraped and extracted locally (in this process): the reference."""
    from test_extract import DEMO_ROOT, crawl_and_extract

    tmp = tmp_path_factory.mktemp("demo-extract")
    site = shutil.copytree(DEMO_ROOT, tmp / "site")
    (tmp / "local").mkdir()
    return crawl_and_extract(tmp / "local", site)


def _same_extract(want: dict, got: dict) -> None:
    strip = {"config.yaml"}  # holds the data_root
    assert {k: v for k, v in want["files"].items() if k not in strip} == \
        {k: v for k, v in got["files"].items() if k not in strip}
    assert want["counts"] == got["counts"] and want["counts"]["kept"] > 20


def _raw_copy(root: Path, dest: Path):
    from tasks.core.config import load_config

    shutil.copytree(root / "raw", dest / "raw")
    return load_config(root / "raw" / "config.yaml", [f"data_root={dest}"])


def test_extract_on_dask_equals_local(tmp_path, demo_pages):
    """extract's page batches parsed on a Dask cluster give the same files as one process."""
    from distributed import Client, LocalCluster, get_task_stream

    from tasks.extract import run_extract

    root, want = demo_pages
    cfg = _raw_copy(root, tmp_path / "dask")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with get_task_stream(client) as ts:
            got = run_extract(cfg, executor=client)
        assert "extract_job" in {t["key"].split("-")[0] for t in ts.data}  # the batches ran on the workers
    assert want["ran_on"] == "this process" and got["ran_on"].startswith("dask ") and "(2 workers)" in got["ran_on"]
    _same_extract(want, got)


def test_the_flow_runs_extract_on_the_dask_task_runner(tmp_path, demo_pages):
    """With dask.address set, the DAG's extract step is a subflow on DaskTaskRunner (same output)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import extract_step

    root, want = demo_pages
    cfg = _raw_copy(root, tmp_path / "flow")
    d = cfg.model_dump(mode="json")
    d["dask"] = {"address": "local", "n_workers": 2, "threads_per_worker": 1, "processes": False}
    cfg = config_from_dict(d)
    with prefect_test_harness(server_startup_timeout=120):
        got = extract_step(cfg, d)
    assert got["ran_on"].startswith("dask ") and "(2 workers)" in got["ran_on"]
    _same_extract(want, got)
