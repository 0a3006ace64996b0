"""Stage 2, extract: raw pages -> readable training text plus structured fields, per category.

Reads ``raw/<category>/pages.parquet`` in batches (scraped pages are parsed per category; imported
dataset records, content type ``application/x-d2a-record+json``, keep their text and mapped fields as
they are) and writes:
  extracted/<category>.parquet   doc_id, url, final_url, fetched_at, sha256, source_id, category, license,
                                 title, text, fields (JSON string)
  extracted/rejects.parquet      url, category, reason, detail (nothing is dropped silently)
  extracted/manifest.json        documents_in == kept + rejected, per category and by reason

Skipped ("skipped: up to date") when the raw fingerprint and the extract config are unchanged.
Incremental: when only some pages changed (a re-scrape), a page whose body (sha256), URL, final URL,
source and licence are those of a page in the previous output is not parsed again: its document or
reject is copied from there, provided the extract config and the parser code are the same
(``parser_fingerprint`` in the manifest). New and changed pages are parsed.
CLI:  python -m tasks.extract --config configs/demo.yaml [section.key=value ...]
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from scrapers.common import path_query
from scrapers.extract_page import PARSERS, TEXT_TYPES, extract_batch, extract_job, extract_page  # noqa: F401 - re-exported
from tasks.core._prefect import task
from tasks.core.cli import clean_errors, stage_args
from tasks.core.config import (
    CATEGORIES,
    PipelineConfig,
    config_from_dict,
    dump_resolved,
)
from tasks.core.manifest import (
    Stage,
    code_fingerprint,
    fingerprint,
    read_manifest,
    require_manifest,
)
from tasks.core.textio import dask_executor, iter_batches, ordered_map, ran_on

log = logging.getLogger("tasks.extract")

DOC_SCHEMA = pa.schema([(n, pa.string()) for n in (
    "doc_id", "url", "final_url", "fetched_at", "sha256", "source_id", "category", "license", "title", "text",
    "fields")])
REJECT_SCHEMA = pa.schema([(n, pa.string()) for n in (
    "url", "category", "reason", "detail", "source_id", "sha256", "final_url", "license")])
READ_BATCH = 64
PARALLEL_MIN_ROWS = 2000
PROGRESS_EVERY_S = 10.0


def _raw_batches(path: Any) -> Iterator[list[dict[str, Any]]]:
    # the shared reader: no pre-buffering, and fewer rows per batch when pages are big (a window of
    # 2 x workers batches in flight stays within ~2 x workers x BATCH_BYTES however large the pages)
    for batch in iter_batches(Path(path), batch_rows=READ_BATCH):
        yield batch.to_pylist()


def extract_workers(total_rows: int, configured: int | None = None) -> int:
    """Processes for extraction: ``extract.workers`` when set, else all cores (at most 8) for big inputs and
    1 for small ones (starting processes costs more than it saves on a few hundred pages)."""
    if configured:
        return max(1, configured)
    return min(os.cpu_count() or 1, 8) if total_rows >= PARALLEL_MIN_ROWS else 1


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    # path+query, not the whole URL: a site that moved host or port keeps its pages (and doc ids)
    url = row.get("url") or ""
    return (row.get("category"), row.get("source_id"), path_query(url), path_query(row.get("final_url") or url),
            row.get("sha256"), row.get("license"))


class Prior:
    """The previous output's parse results by page key: (kind, table, row) for documents, the reject dict
    for rejects. Tables are memory-mapped; a document's text is read only when it is reused."""

    def __init__(self) -> None:
        self.index: dict[tuple[Any, ...], tuple[str, Any, int]] = {}
        self.hits = 0

    @classmethod
    def load(cls, out_dir: Any, parser_fp: str) -> Prior:
        prior = cls()
        m = read_manifest(out_dir)
        if not m or m.get("parser_fingerprint") != parser_fp:
            return prior
        try:
            for path in sorted(out_dir.glob("*.parquet")):
                table = pq.read_table(path, memory_map=True)
                cols = ("category", "source_id", "url", "final_url", "sha256", "license")
                keys = (_row_key(dict(zip(cols, k))) for k in zip(*(table.column(c).to_pylist() for c in cols)))
                kind = "reject" if path.name == "rejects.parquet" else "doc"
                for i, k in enumerate(keys):
                    prior.index[k] = (kind, table, i)
        except (OSError, pa.ArrowException, KeyError) as e:  # an unreadable previous output: parse everything
            log.warning("extract: previous output unreadable (%s); parsing every page", e)
            prior.index.clear()
        return prior

    def get(self, row: dict[str, Any]) -> tuple[Any, Any] | None:
        hit = self.index.get(_row_key(row))
        if hit is None:
            return None
        kind, table, i = hit
        self.hits += 1
        old = table.slice(i, 1).to_pylist()[0]
        if kind == "reject":
            return None, {**old, "url": row["url"], "source_id": row.get("source_id"), "sha256": row.get("sha256")}
        keep = {k: old[k] for k in ("doc_id", "title", "text", "fields")}
        return {**old, **keep, "url": row["url"], "final_url": row.get("final_url") or row["url"],
                "fetched_at": row.get("fetched_at"), "sha256": row.get("sha256"), "source_id": row["source_id"],
                "category": row["category"], "license": row.get("license")}, None


def _with_prior(rows: list[dict[str, Any]], prior: Prior) -> tuple[list[Any], list[dict[str, Any]]]:
    """Per row: the reused (doc, reject), or None where the row must be parsed; and the rows to parse."""
    done = [prior.get(r) if prior.index else None for r in rows]
    return done, [r for r, d in zip(rows, done) if d is None]


def _merge(done: list[Any], parsed: list[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    it = iter(parsed)
    for d in done:
        yield d if d is not None else next(it)


def _extracted(path: Any, min_text_chars: int, executor: Any = None, workers: int = 1,
               prior: Prior | None = None) -> Iterator[tuple[Any, Any]]:
    """(doc, reject) per raw row, in input order. ``executor`` (the stage's process pool, or a Dask
    client when the stage runs on a Dask worker) parses the batches with a bounded window in flight;
    without one, this process does. Rows whose page is unchanged since the previous output are taken
    from it, not parsed."""
    prior = prior or Prior()

    def jobs():
        for rows in _raw_batches(path):
            done, todo = _with_prior(rows, prior)
            yield done, (todo, min_text_chars)

    window = 2 * workers if executor is not None and not hasattr(executor, "scheduler_info") else None
    for done, parsed in ordered_map(extract_job, jobs(), workers, window=window, executor=executor):
        yield from _merge(done, parsed)


# the parsers this stage runs (not the fetcher, the test sites or the benchmarks)
CODE_FILES = ("tasks/extract.py", "scrapers/extract_page.py", "scrapers/common.py", "scrapers/dataset_import.py",
              "scrapers/recipes.py", "scrapers/products.py", "scrapers/articles.py", "scrapers/code.py",
              "scrapers/additives.py", "scrapers/urls.py", "tasks/core/textio.py")


def run_extract(cfg: PipelineConfig, executor: Any = None) -> dict[str, Any]:
    """Parse every scraped page into a document or a reject, per category, in page order. The batches
    run in ``extract.workers`` local processes, or on ``executor`` (a Dask client: the stage as a task
    on a DaskTaskRunner); the output is the same either way."""
    raw_dir = cfg.root / "raw"
    raw_manifest = require_manifest(raw_dir, "scrape")
    # the worker count does not change the output, so it is not part of the fingerprint
    stage = Stage("extract", cfg.root / "extracted", code=CODE_FILES,
                  config={k: v for k, v in cfg.section("extract").items() if k != "workers"},
                  # the pages fingerprint, not the scrape stage's: a new User-Agent or delay changes no page
                  inputs={"pages": raw_manifest["inputs"]["pages"]})
    done = stage.up_to_date()
    if done is not None:
        log.info("extract skipped: up to date (%s)", stage.out_dir)
        return done
    t0 = time.monotonic()
    # parse results may be reused only under the same config and parser code
    parser_fp = fingerprint({"config": stage.config, "code": code_fingerprint(CODE_FILES)})
    prior = Prior.load(stage.out_dir, parser_fp)
    n_reused = 0
    per_cat: dict[str, dict[str, int]] = {}
    reasons: Counter[str] = Counter()
    n_in = n_kept = n_rej = 0
    paths = {c: raw_dir / c / "pages.parquet" for c in CATEGORIES if (raw_dir / c / "pages.parquet").is_file()}
    largest = max((pq.ParquetFile(p).metadata.num_rows for p in paths.values()), default=0)
    workers = extract_workers(largest, cfg.extract.workers)
    # one pool for the whole stage (workers import scrapers.extract_page only: no Prefect, quick to start)
    pool = (ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
            if workers > 1 and executor is None else None)
    with contextlib.ExitStack() as stack, stage.building() as work:
        if pool is not None:
            stack.enter_context(pool)
        rej_writer = pq.ParquetWriter(work / "rejects.parquet", REJECT_SCHEMA)
        rejects: list[dict[str, Any]] = []
        for category, path in paths.items():
            counts = per_cat.setdefault(category, {"documents_in": 0, "kept": 0, "rejected": 0})
            total = pq.ParquetFile(path).metadata.num_rows
            t_cat, last = time.monotonic(), time.monotonic()
            with pq.ParquetWriter(work / f"{category}.parquet", DOC_SCHEMA) as writer:
                docs: list[dict[str, Any]] = []
                for doc, rej in _extracted(path, cfg.extract.min_text_chars, executor or pool, workers, prior):
                    n_in += 1
                    counts["documents_in"] += 1
                    if time.monotonic() - last >= PROGRESS_EVERY_S:
                        last = time.monotonic()
                        rate = counts["documents_in"] / (last - t_cat)
                        log.info("extract %s: %d/%d pages (%.1f pages/s, ETA %.0fs)", category,
                                 counts["documents_in"], total, rate, (total - counts["documents_in"]) / rate)
                    if doc is not None:
                        docs.append(doc)
                        n_kept += 1
                        counts["kept"] += 1
                    else:
                        rejects.append(rej)
                        reasons[rej["reason"]] += 1
                        n_rej += 1
                        counts["rejected"] += 1
                        log.info("rejected %s (%s): %s", rej["url"], rej["reason"], rej["detail"])
                    if len(docs) >= READ_BATCH:
                        writer.write_table(pa.Table.from_pylist(docs, schema=DOC_SCHEMA))
                        docs = []
                    if len(rejects) >= READ_BATCH:
                        rej_writer.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
                        rejects = []
                if docs:
                    writer.write_table(pa.Table.from_pylist(docs, schema=DOC_SCHEMA))
            log.info("extract %s: %d in, %d kept, %d rejected", category, counts["documents_in"], counts["kept"],
                     counts["rejected"])
        if rejects:
            rej_writer.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
        rej_writer.close()
        if n_in != n_kept + n_rej:
            raise AssertionError(f"extract: documents_in {n_in} != kept {n_kept} + rejected {n_rej}")
        dump_resolved(cfg, work / "config.yaml")
        dt = time.monotonic() - t0
        n_reused = prior.hits
        counts = {"documents_in": n_in, "kept": n_kept, "rejected": n_rej, "reused": n_reused,
                  "parsed": n_in - n_reused, "per_category": per_cat,
                  "rejects_by_reason": dict(sorted(reasons.items()))}
        manifest = stage.manifest(work, counts, seconds=round(dt, 3), parser_fingerprint=parser_fp,
                                  pages_per_s=round(n_in / dt, 2) if dt > 0 else None,
                                  ran_on=ran_on(executor, workers))
    log.info("extract: %d pages in %.1fs (%.1f pages/s), %d kept, %d rejected %s", n_in, dt, n_in / max(dt, 1e-9),
             n_kept, n_rej, dict(reasons))
    return manifest


@task(name="extract")
def extract(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Prefect task: the extract stage on a plain config dict (serializable)."""
    with dask_executor() as ex:  # on a Dask worker (DaskTaskRunner): parse the batches across the cluster
        return run_extract(config_from_dict(cfg_dict), executor=ex)


@clean_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = stage_args("Extract text and fields from <data root>/raw into extracted/.", argv)
    m = run_extract(cfg)
    c = m["counts"]
    print(f"extract: {c['documents_in']} pages -> {c['kept']} documents, {c['rejected']} rejected "
          f"{c['rejects_by_reason']} -> {cfg.root / 'extracted'}")


if __name__ == "__main__":
    main()
