"""Stage 2, extract: raw pages -> readable training text plus structured fields, per category.

Reads ``raw/<category>/pages.parquet`` in batches and writes:
  extracted/<category>.parquet   doc_id, url, final_url, fetched_at, sha256, source_id, category, license,
                                 title, text, fields (JSON string)
  extracted/rejects.parquet      url, category, reason, detail (nothing is dropped silently)
  extracted/manifest.json        documents_in == kept + rejected, per category and by reason

Skipped ("skipped: up to date") when the raw fingerprint and the extract config are unchanged.
CLI:  python -m tasks.extract --config configs/demo.yaml [section.key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from scrapers import additives, articles, code, products, recipes
from scrapers.common import ParseReject, Page, Parsed, decode_body, doc_id, looks_binary, make_page, to_json
from tasks.config import CATEGORIES, PipelineConfig, config_from_dict, dump_resolved, load_config
from tasks.manifest import Stage, require_manifest

log = logging.getLogger("tasks.extract")

PARSERS: dict[str, Callable[[Page], Parsed]] = {
    "recipes": recipes.parse,
    "product_compositions": products.parse_composition,
    "articles": articles.parse,
    "code": code.parse,
    "product_descriptions": products.parse_description,
    "chemical_additives": additives.parse,
}
DOC_SCHEMA = pa.schema([(n, pa.string()) for n in (
    "doc_id", "url", "final_url", "fetched_at", "sha256", "source_id", "category", "license", "title", "text",
    "fields")])
REJECT_SCHEMA = pa.schema([(n, pa.string()) for n in ("url", "category", "reason", "detail", "source_id", "sha256")])
READ_BATCH = 64
PARALLEL_MIN_ROWS = 2000
PROGRESS_EVERY_S = 10.0
TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")


def extract_page(row: dict[str, Any], min_text_chars: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """One raw row -> (document, None) or (None, reject). Never raises for bad input."""
    url, category = row["url"], row["category"]
    body: bytes = row["body"] or b""

    def reject(reason: str, detail: str) -> tuple[None, dict[str, Any]]:
        return None, {"url": url, "category": category, "reason": reason, "detail": detail,
                      "source_id": row.get("source_id"), "sha256": row.get("sha256")}

    ctype = (row.get("content_type") or "").split(";")[0].strip().lower()
    if not body.strip():
        return reject("empty", "empty body")
    if ctype and ctype not in TEXT_TYPES:
        return reject("binary", f"content type {ctype}")
    if looks_binary(body):
        return reject("binary", "body has NUL/control bytes")
    try:
        html, encoding = decode_body(body, row.get("content_type"))
    except (LookupError, UnicodeError) as e:
        return reject("decode_error", str(e))
    parser = PARSERS.get(category)
    if parser is None:
        return reject("unknown_category", category)
    try:
        if ctype == "text/plain":
            parsed = articles.parse_plain(url, html)
        else:
            parsed = parser(make_page(row.get("final_url") or url, html, row.get("license")))
    except ParseReject as e:
        return reject(e.reason, e.detail)
    except Exception as e:  # noqa: BLE001 - a parser bug on one page is a counted reject, not a crash
        log.warning("%s: unparseable (%s: %s)", url, type(e).__name__, e)
        return reject("unparseable", f"{type(e).__name__}: {e}")
    text = parsed.text.strip()
    if not text:
        return reject("empty", "no text extracted")
    if len(text) < min_text_chars:
        return reject("too_short", f"{len(text)} chars < min_text_chars {min_text_chars}")
    fields = {**parsed.fields, "encoding": encoding}
    return {
        "doc_id": doc_id(row["source_id"], url), "url": url, "final_url": row.get("final_url") or url,
        "fetched_at": row.get("fetched_at"), "sha256": row.get("sha256"), "source_id": row["source_id"],
        "category": category, "license": row.get("license"), "title": parsed.title, "text": text,
        "fields": to_json(fields),
    }, None


def _raw_batches(path: Any) -> Iterator[list[dict[str, Any]]]:
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=READ_BATCH):
        yield batch.to_pylist()


def _extract_batch(rows: list[dict[str, Any]], min_text_chars: int) -> list[tuple[Any, Any]]:
    return [extract_page(r, min_text_chars) for r in rows]


def extract_workers(total_rows: int) -> int:
    """Processes for extraction: $D2A_EXTRACT_WORKERS, else all cores for big inputs and 1 for small ones
    (starting processes costs more than it saves on a few hundred pages)."""
    env = os.environ.get("D2A_EXTRACT_WORKERS")
    if env:
        return max(1, int(env))
    return min(os.cpu_count() or 1, 8) if total_rows >= PARALLEL_MIN_ROWS else 1


def _extracted(path: Any, min_text_chars: int, workers: int) -> Iterator[tuple[Any, Any]]:
    """(doc, reject) per raw row, in input order; with workers > 1 a bounded window of batches is in flight."""
    if workers <= 1:
        for rows in _raw_batches(path):
            yield from _extract_batch(rows, min_text_chars)
        return
    ctx = mp.get_context("spawn")  # no fork of a process that holds threads (Prefect, servers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        window: deque[Any] = deque()
        for rows in _raw_batches(path):
            window.append(pool.submit(_extract_batch, rows, min_text_chars))
            if len(window) >= 2 * workers:
                yield from window.popleft().result()
        while window:
            yield from window.popleft().result()


def run_extract(cfg: PipelineConfig) -> dict[str, Any]:
    raw_dir = cfg.root / "raw"
    raw_manifest = require_manifest(raw_dir, "scrape")
    stage = Stage("extract", cfg.root / "extracted", config=cfg.section("extract"),
                  # the pages fingerprint, not the scrape stage's: a new User-Agent or delay changes no page
                  inputs={"pages": raw_manifest["inputs"]["pages"]})
    done = stage.up_to_date()
    if done is not None:
        log.info("extract skipped: up to date (%s)", stage.out_dir)
        return done
    t0 = time.monotonic()
    per_cat: dict[str, dict[str, int]] = {}
    reasons: Counter[str] = Counter()
    n_in = n_kept = n_rej = 0
    with stage.building() as work:
        rej_writer = pq.ParquetWriter(work / "rejects.parquet", REJECT_SCHEMA)
        rejects: list[dict[str, Any]] = []
        for category in CATEGORIES:
            path = raw_dir / category / "pages.parquet"
            if not path.is_file():
                continue
            counts = per_cat.setdefault(category, {"documents_in": 0, "kept": 0, "rejected": 0})
            total = pq.ParquetFile(path).metadata.num_rows
            workers = extract_workers(total)
            t_cat, last = time.monotonic(), time.monotonic()
            with pq.ParquetWriter(work / f"{category}.parquet", DOC_SCHEMA) as writer:
                docs: list[dict[str, Any]] = []
                for doc, rej in _extracted(path, cfg.extract.min_text_chars, workers):
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
        counts = {"documents_in": n_in, "kept": n_kept, "rejected": n_rej, "per_category": per_cat,
                  "rejects_by_reason": dict(sorted(reasons.items()))}
        manifest = stage.manifest(work, counts, seconds=round(dt, 3),
                                  pages_per_s=round(n_in / dt, 2) if dt > 0 else None)
    log.info("extract: %d pages in %.1fs (%.1f pages/s), %d kept, %d rejected %s", n_in, dt, n_in / max(dt, 1e-9),
             n_kept, n_rej, dict(reasons))
    return manifest


@task(name="extract")
def extract(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Prefect task: the extract stage on a plain config dict (serializable)."""
    return run_extract(config_from_dict(cfg_dict))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Extract text and fields from <data root>/raw into extracted/.")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    cfg = load_config(args.config, args.overrides)
    m = run_extract(cfg)
    c = m["counts"]
    print(f"extract: {c['documents_in']} pages -> {c['kept']} documents, {c['rejected']} rejected "
          f"{c['rejects_by_reason']} -> {cfg.root / 'extracted'}")


if __name__ == "__main__":
    main()
