"""Stage 1, scrape: crawl the allow-listed sources politely and publish ``raw/``.

Writes under the data root:
  raw/<category>/pages.parquet   one row per published page (body as bytes, provenance columns)
  raw/fetch_log.jsonl            every request decision of this crawl, with its reason
  raw/manifest.json              config, pages fingerprint, counts (new/changed/unchanged/gone, ...)
  scrape_state/                  frontier, per-URL validators and bodies (resume, conditional GET)

The stage always runs (the web changes); its ``pages`` fingerprint depends only on the pages'
paths and content hashes, so downstream stages skip when nothing changed.

CLI (no Prefect server needed):  python -m tasks.scrape --config configs/demo.yaml [section.key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from prefect import task

from scrapers.crawl import Crawler, CrawlState, check_sources, read_decisions, seeds_fingerprint
from scrapers.fetcher import FetchLog
from scrapers.testsite import demo_site_env
from tasks.config import PipelineConfig, config_from_dict, dump_resolved, load_config, load_sources, resolve_path
from tasks.manifest import Stage

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


def run_scrape(cfg: PipelineConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Crawl (or resume) one generation and publish ``raw/``; returns the manifest dict.

    ``stop`` ends the crawl early like a kill would (state kept, nothing published).
    """
    sources, refused = check_sources(load_sources(cfg.scrape.sources))
    if not sources:
        raise ValueError(f"{cfg.scrape.sources}: no usable source; " + "; ".join(r["reason"] for r in refused))
    root = cfg.root
    with _exclusive(root / "scrape_state"):
        return _scrape_locked(cfg, sources, refused, stop)


def _scrape_locked(cfg: PipelineConfig, sources: list[Any], refused: list[dict[str, str]],
                   stop: threading.Event | None) -> dict[str, Any]:
    root = cfg.root
    state = CrawlState(root / "scrape_state")
    try:
        log_dir = root / "scrape_state" / "logs"
        gen, resumed, prev = state.begin(seeds_fingerprint(sources))
        # one log file per generation, so a resumed crawl appends to the same audit trail
        fetch_log = FetchLog(log_dir / f"fetch-{gen:06d}.jsonl")
        try:
            crawler = Crawler(cfg.scrape, sources, state, fetch_log)
            summary = crawler.run(gen, resumed, prev, stop)
        finally:
            fetch_log.close()
        if summary.stopped:
            raise InterruptedError(f"scrape stopped early; state kept in {root / 'scrape_state'}, rerun to resume")
        return _publish(cfg, state, summary, fetch_log.path, refused)
    finally:
        state.close()


def _publish(cfg: PipelineConfig, state: CrawlState, summary: Any, fetch_log_path: Path,
             refused_sources: list[dict[str, str]]) -> dict[str, Any]:
    pages_fp, n_pages = state.pages_fingerprint(summary.gen)
    stage = Stage("scrape", cfg.root / "raw",
                  config={"scrape": cfg.section("scrape"), "sources": _sources_for_manifest(cfg.scrape.sources)},
                  inputs={"pages": pages_fp})
    per_category: dict[str, int] = {}
    with stage.building() as work:
        writers: dict[str, pq.ParquetWriter] = {}
        batch: list[dict[str, Any]] = []
        batch_bytes = 0
        current = None

        def flush() -> None:
            nonlocal batch, batch_bytes
            if batch:
                writers[current].write_table(pa.Table.from_pylist(batch, schema=RAW_SCHEMA))
            batch, batch_bytes = [], 0

        for r in state.published_rows(summary.gen):  # ordered by category: one open writer at a time, bounded batches
            if r["category"] != current:
                flush()
                current = r["category"]
                (work / current).mkdir(parents=True, exist_ok=True)
                writers[current] = pq.ParquetWriter(work / current / "pages.parquet", RAW_SCHEMA,
                                                    compression="zstd")
            body = state.blobs.get(r["sha256"])
            batch.append({"url": r["url"], "final_url": r["final_url"], "fetched_at": r["fetched_at"],
                          "status": r["body_status"], "etag": r["etag"], "last_modified": r["last_modified"],
                          "content_type": r["content_type"], "sha256": r["sha256"], "category": r["category"],
                          "source_id": r["source_id"], "license": r["license"], "decision": r["decision"],
                          "body": body})
            batch_bytes += len(body)
            per_category[current] = per_category.get(current, 0) + 1
            if len(batch) >= BATCH_ROWS or batch_bytes >= BATCH_BYTES:
                flush()
        flush()
        for w in writers.values():
            w.close()
        shutil.copyfile(fetch_log_path, work / "fetch_log.jsonl")
        dump_resolved(cfg, work / "config.yaml")
        decisions = read_decisions(fetch_log_path)
        counts = {
            "pages": n_pages,
            "pages_per_category": per_category,
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
            "refused_sources": len(refused_sources),
        }
        manifest = stage.manifest(work, counts, generation=summary.gen, resumed=summary.resumed,
                                  seconds=round(summary.seconds, 3), refused_sources=refused_sources)
    state.mark_published(summary.gen)
    log.info("scrape published %d pages to %s: %s", n_pages, cfg.root / "raw",
             {k: counts[k] for k in ("new", "changed", "unchanged", "gone", "fetched", "not_modified", "errors")})
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


@task(name="scrape")
def scrape(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Prefect task: the scrape stage on a plain config dict (serializable).

    Progress goes to the ``scrapers`` / ``tasks.scrape`` loggers; Prefect shows them when they are in
    PREFECT_LOGGING_EXTRA_LOGGERS (flows/cli.py sets it).
    """
    return run_scrape(config_from_dict(cfg_dict))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Scrape the allow-listed sources into <data root>/raw.")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    cfg = load_config(args.config, args.overrides)
    with demo_site_env(cfg):
        m = run_scrape(cfg)
    c = m["counts"]
    print(f"scrape: {c['pages']} pages {c['pages_per_category']} -> {cfg.root / 'raw'}; "
          f"new {c['new']}, changed {c['changed']}, unchanged {c['unchanged']}, gone {c['gone']}; "
          f"refused {c['refused']}, errors {c['errors']}")


if __name__ == "__main__":
    main()
