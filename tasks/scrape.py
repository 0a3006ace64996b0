"""Stage 1, scrape: crawl the allow-listed web sources politely, import the dataset sources, publish ``raw/``.

Writes under the data root:
  raw/<category>/pages.parquet   one row per published page or imported record (body as bytes, provenance)
  raw/fetch_log.jsonl            every request decision of this crawl, with its reason
  raw/import_rejects.jsonl       dataset records that could not be imported (file, line/row, reason)
  raw/manifest.json              config, pages fingerprint, counts (new/changed/unchanged/gone, imported, ...)
  scrape_state/                  frontier, per-URL validators and bodies (resume, conditional GET),
                                 dataset file hashes (an unchanged dataset is not re-hashed)

The stage always runs (the web changes); its ``pages`` fingerprint depends only on the pages'
paths and content hashes (and, with dataset sources, on each dataset's file contents and column
mapping), so downstream stages skip when nothing changed.

CLI (no Prefect server needed):  python -m tasks.scrape --config configs/demo.yaml [section.key=value ...]
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import requests
import yaml

from scrapers import dataset_import
from scrapers.crawl import Crawler, CrawlState, check_sources, read_decisions, seeds_fingerprint
from scrapers.dataset_import import ImportStats
from scrapers.fetcher import FetchLog
from scrapers.testsite import demo_site_env
from tasks.core._prefect import RetryPolicy, task
from tasks.core.cli import clean_errors, stage_args
from tasks.core.config import (
    CATEGORIES,
    PipelineConfig,
    SourceConfig,
    config_from_dict,
    dump_resolved,
    load_sources,
    resolve_path,
)
from tasks.core.manifest import Stage, fingerprint

log = logging.getLogger("tasks.scrape")

RAW_SCHEMA = pa.schema([
    ("url", pa.string()), ("final_url", pa.string()), ("fetched_at", pa.string()), ("status", pa.int32()),
    ("etag", pa.string()), ("last_modified", pa.string()), ("content_type", pa.string()), ("sha256", pa.string()),
    ("category", pa.string()), ("source_id", pa.string()), ("license", pa.string()), ("decision", pa.string()),
    ("body", pa.binary()),
])
BATCH_ROWS = 256
BATCH_BYTES = 64 * 1024 * 1024


def _sources_for_manifest(path: str) -> list[dict[str, Any]]:
    """Sources as written (``${DEMO_SITE}`` unexpanded), so the fingerprint does not depend on a port."""
    data = yaml.safe_load(resolve_path(path).read_text(encoding="utf-8")) or {}
    return list(data.get("sources", []))


CODE_FILES = ("tasks/scrape.py",)  # a re-scrape is driven by its schedule and the sites, not by code edits


def run_scrape(cfg: PipelineConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Crawl (or resume) one generation, import the dataset sources, and publish ``raw/``; returns the manifest.

    ``stop`` ends the crawl early like a kill would (state kept, nothing published).
    """
    sources, refused = check_sources(load_sources(cfg.scrape.sources))
    if not sources:
        raise ValueError(f"{cfg.scrape.sources}: no usable source; " + "; ".join(r["reason"] for r in refused))
    root = cfg.root
    with _exclusive(root / "scrape_state"):
        return _scrape_locked(cfg, sources, refused, stop)


def _scrape_locked(cfg: PipelineConfig, sources: list[SourceConfig], refused: list[dict[str, str]],
                   stop: threading.Event | None) -> dict[str, Any]:
    root = cfg.root
    web = [s for s in sources if s.kind == "web"]
    datasets = [s for s in sources if s.kind == "dataset"]
    state = CrawlState(root / "scrape_state")
    try:
        log_dir = root / "scrape_state" / "logs"
        gen, resumed, prev = state.begin(seeds_fingerprint(web))
        # one log file per generation, so a resumed crawl appends to the same audit trail
        fetch_log = FetchLog(log_dir / f"fetch-{gen:06d}.jsonl")
        try:
            crawler = Crawler(cfg.scrape, web, state, fetch_log, max_hosts_parallel=cfg.scrape.max_parallel_hosts)
            summary = crawler.run(gen, resumed, prev, stop)
        finally:
            fetch_log.close()
        if summary.stopped:
            raise InterruptedError(f"scrape stopped early; state kept in {root / 'scrape_state'}, rerun to resume")
        return _publish(cfg, state, summary, fetch_log.path, refused, datasets)
    finally:
        state.close()


def _dataset_fingerprints(cfg: PipelineConfig, datasets: list[SourceConfig],
                          refused: list[dict[str, str]]) -> list[tuple[SourceConfig, str]]:
    out = []
    for s in datasets:
        try:
            out.append((s, dataset_import.fingerprint(s, cfg.root / "scrape_state" / "dataset_hashes.json")))
        except (OSError, dataset_import.DatasetError) as e:
            reason = f"source {s.id!r} refused: {e}"
            log.error(reason)
            refused.append({"id": s.id, "reason": reason})
    return out


def _publish(cfg: PipelineConfig, state: CrawlState, summary: Any, fetch_log_path: Path,
             refused_sources: list[dict[str, str]], datasets: list[SourceConfig] = ()) -> dict[str, Any]:
    web_fp, n_web = state.pages_fingerprint(summary.gen)
    ds_fps = _dataset_fingerprints(cfg, list(datasets), refused_sources)
    # web-only: the pages fingerprint as before; with imports, it covers each dataset's content too
    pages_fp = web_fp if not ds_fps else fingerprint([web_fp, sorted((s.id, fp) for s, fp in ds_fps)])
    stage = Stage("scrape", cfg.root / "raw", code=CODE_FILES,
                  config={"scrape": cfg.section("scrape"), "sources": _sources_for_manifest(cfg.scrape.sources)},
                  inputs={"pages": pages_fp})
    per_category: dict[str, int] = {}
    imported: dict[str, ImportStats] = {}
    n_import_rejects = 0
    with stage.building() as work:
        rej_f = open(work / "import_rejects.jsonl", "w", encoding="utf-8") if ds_fps else None  # noqa: SIM115

        def web_rows(category: str) -> Iterator[dict[str, Any]]:
            for r in state.published_rows(summary.gen, category=category):
                yield {"url": r["url"], "final_url": r["final_url"], "fetched_at": r["fetched_at"],
                       "status": r["body_status"], "etag": r["etag"], "last_modified": r["last_modified"],
                       "content_type": r["content_type"], "sha256": r["sha256"], "category": r["category"],
                       "source_id": r["source_id"], "license": r["license"], "decision": r["decision"],
                       "body": state.blobs.get(r["sha256"])}

        def dataset_rows(category: str) -> Iterator[dict[str, Any]]:
            nonlocal n_import_rejects
            for s, _ in ds_fps:
                if s.category != category:
                    continue
                stats = imported.setdefault(s.id, ImportStats())
                for row, rej in dataset_import.import_rows(s, stats):
                    if row is not None:
                        yield row
                    else:
                        n_import_rejects += 1
                        rej_f.write(json.dumps(rej, ensure_ascii=False) + "\n")
                if stats.error:
                    refused_sources.append({"id": s.id, "reason": stats.error})

        # one category at a time: one open writer, bounded batches (web pages, then imported records)
        for category in CATEGORIES:
            writer: pq.ParquetWriter | None = None
            batch: list[dict[str, Any]] = []
            batch_bytes = 0
            for row in itertools.chain(web_rows(category), dataset_rows(category)):
                if writer is None:
                    (work / category).mkdir(parents=True, exist_ok=True)
                    writer = pq.ParquetWriter(work / category / "pages.parquet", RAW_SCHEMA, compression="zstd")
                batch.append(row)
                batch_bytes += len(row["body"])
                per_category[category] = per_category.get(category, 0) + 1
                if len(batch) >= BATCH_ROWS or batch_bytes >= BATCH_BYTES:
                    writer.write_table(pa.Table.from_pylist(batch, schema=RAW_SCHEMA))
                    batch, batch_bytes = [], 0
            if writer is not None:
                if batch:
                    writer.write_table(pa.Table.from_pylist(batch, schema=RAW_SCHEMA))
                writer.close()
        if rej_f is not None:
            rej_f.close()
        shutil.copyfile(fetch_log_path, work / "fetch_log.jsonl")
        dump_resolved(cfg, work / "config.yaml")
        decisions = read_decisions(fetch_log_path)
        n_imported = sum(st.rows for st in imported.values())
        counts = {
            "pages": n_web + n_imported,  # rows in raw/: web pages + imported dataset records
            "pages_per_category": per_category,
            "web_pages": n_web,
            # page decisions; robots.txt, tdmrep.json and sitemap requests are in requests_by_kind
            "fetched": decisions["pages"].get("fetched", 0),
            "not_modified": decisions["pages"].get("not_modified", 0),
            "refused": {k: v for k, v in decisions["pages"].items() if k.startswith("refused_")},
            "errors": decisions["pages"].get("error", 0),
            "requests": decisions["by_decision"],
            "requests_by_kind": decisions["by_kind"],
            **state.change_counts(summary.gen, summary.prev_gen),
            "out_of_scope_links": summary.out_of_scope_links,
            "over_max_pages": summary.over_max_pages,
            # RFC 9309: hosts whose robots.txt was unreachable; nothing fetched, earlier pages kept (stale_kept)
            "robots_unreachable_hosts": sorted(summary.robots_unreachable),
            "imported": n_imported,
            "import_rejects": n_import_rejects,
            "imported_per_source": {k: v.as_dict() for k, v in sorted(imported.items())},
            "refused_sources": len(refused_sources),
        }
        manifest = stage.manifest(work, counts, generation=summary.gen, resumed=summary.resumed,
                                  seconds=round(summary.seconds, 3), refused_sources=refused_sources,
                                  web_pages_fingerprint=web_fp, robots_unreachable=summary.robots_unreachable,
                                  dataset_fingerprints={s.id: fp for s, fp in ds_fps})
    state.mark_published(summary.gen)
    log.info("scrape published %d pages to %s: %s", counts["pages"], cfg.root / "raw",
             {k: counts[k] for k in ("new", "changed", "unchanged", "gone", "fetched", "not_modified", "errors",
                                     "imported", "import_rejects")})
    return manifest


@contextlib.contextmanager
def _exclusive(state_dir: Path) -> Iterator[None]:
    """One scrape per data root at a time: two crawls sharing a state database would corrupt each other's view."""
    import fcntl

    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another scrape is running on {state_dir} (lock held)") from None
        yield


# only what a flaky network causes is worth a retry (requests' errors are OSError subclasses too, but a
# config error or a bug would fail the same way again); the numbers are the config's timeouts.scrape
SCRAPE_RETRY = RetryPolicy(retry_on=(ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout))


@task(name="scrape")
def scrape(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Prefect task: the scrape stage on a plain config dict (serializable).

    Progress goes to the ``scrapers`` / ``tasks.scrape`` loggers; Prefect shows them when they are in
    PREFECT_LOGGING_EXTRA_LOGGERS (flows/cli.py sets it).
    """
    return run_scrape(config_from_dict(cfg_dict))


@clean_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = stage_args("Scrape the allow-listed sources into <data root>/raw.", argv, verify=False)
    with demo_site_env(cfg.demo_site):
        m = run_scrape(cfg)
    c = m["counts"]
    print(f"scrape: {c['pages']} pages {c['pages_per_category']} -> {cfg.root / 'raw'}; "
          f"new {c['new']}, changed {c['changed']}, unchanged {c['unchanged']}, gone {c['gone']}; "
          f"refused {c['refused']}, errors {c['errors']}")


if __name__ == "__main__":
    main()
