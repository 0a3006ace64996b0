"""Benchmark: fetch + extract throughput against many local hosts with no delay.

    python -m benchmarks.bench_scrape --hosts 8 --pages-per-host 150

Builds a synthetic site from the demo site's content pages (each host serves its own copy, as
many pages as asked, spread over the six categories), serves every host from a separate process
(so the server's CPU is not counted), then runs the real scrape and extract stages with
``min_delay_s=0`` and reports pages/s and CPU seconds per page for each, and what that means for
a corpus of a given size in tokens (default 56B; ~4 characters per token).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from tasks.core.config import REPO_ROOT, PipelineConfig

CATEGORY_DIRS = {"recipes": "recipes", "products": "product_compositions", "articles": "articles", "code": "code",
                 "shop": "product_descriptions", "additives": "chemical_additives"}


def build_site(template: Path, out: Path, pages: int) -> dict[str, int]:
    """``pages`` content pages cycled from the template's category folders, with index pages linking them."""
    per_dir: dict[str, list[Path]] = {}
    for d in CATEGORY_DIRS:
        files = sorted(p for p in (template / d).glob("*.html") if p.name != "index.html")
        if files:
            per_dir[d] = files
    if not per_dir:
        raise FileNotFoundError(f"no category pages under {template}")
    counts = {d: 0 for d in per_dir}
    dirs = list(per_dir)
    links: dict[str, list[str]] = {d: [] for d in dirs}
    for i in range(pages):
        d = dirs[i % len(dirs)]
        src = per_dir[d][counts[d] % len(per_dir[d])]
        name = f"{src.stem}-{counts[d]}.html"
        (out / d).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / d / name)
        links[d].append(name)
        counts[d] += 1
    for d, names in links.items():
        items = "".join(f'<li><a href="{n}">{n}</a></li>' for n in names)
        (out / d / "index.html").write_text(f"<html><body><main><ul>{items}</ul></main></body></html>")
    (out / "robots.txt").write_text("User-agent: *\nAllow: /\n")
    return counts


def _serve(root: str, n_hosts: int, conn: Any) -> None:
    import contextlib

    from scrapers.testsite import serve_site

    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serve_site(root)).url for _ in range(n_hosts)]
        conn.send(urls)
        conn.recv()  # block until the parent is done


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_bench(hosts: int, pages_per_host: int, corpus_tokens: float, template: Path) -> dict[str, Any]:
    from tasks.extract import run_extract
    from tasks.scrape import run_scrape

    work = Path(tempfile.mkdtemp(prefix="scrape-bench-"))
    try:
        build_site(template, work / "site", pages_per_host)
        parent, child = mp.Pipe()
        server = mp.get_context("spawn").Process(target=_serve, args=(str(work / "site"), hosts, child), daemon=True)
        server.start()
        urls = parent.recv()
        sources = [{"id": f"bench-{h}-{cat}", "category": cat, "start_urls": [f"{u}/{d}/"], "include": [f"/{d}/"],
                    "permission": {"evidence_url": f"{u}/terms.html", "license": "CC-BY-4.0", "note": "benchmark"}}
                   for h, u in enumerate(urls) for d, cat in CATEGORY_DIRS.items() if (work / "site" / d).is_dir()]
        (work / "sources.yaml").write_text(yaml.safe_dump({"sources": sources}))
        cfg = PipelineConfig.model_validate({
            "data_root": str(work / "data"),
            "scrape": {"sources": str(work / "sources.yaml"), "min_delay_s": 0.0,
                       "allow_private_addresses": ["127.0.0.1"]},
            "model": {"name": "unused"}})
        t0, c0 = time.monotonic(), _cpu()
        sm = run_scrape(cfg)
        t1, c1 = time.monotonic(), _cpu()
        em = run_extract(cfg)
        t2, c2 = time.monotonic(), _cpu()
        parent.send("stop")
        server.join(timeout=10)
        pages = sm["counts"]["pages"]
        raw_bytes = sum(pq.ParquetFile(p).metadata.num_rows and sum(len(b) for b in pq.read_table(p, columns=["body"])
                        .column("body").to_pylist()) for p in (work / "data" / "raw").glob("*/pages.parquet"))
        chars = sum(sum(len(t) for t in pq.read_table(p, columns=["text"]).column("text").to_pylist())
                    for p in (work / "data" / "extracted").glob("*.parquet") if p.name != "rejects.parquet")
        kept = em["counts"]["kept"]
        tokens_per_doc = chars / max(kept, 1) / 4.0
        fetch_cpu, extract_cpu = (c1 - c0) / max(pages, 1), (c2 - c1) / max(pages, 1)
        docs_needed = corpus_tokens / max(tokens_per_doc, 1e-9)
        return {
            "hosts": hosts, "pages": pages, "kept": kept, "raw_mb": round(raw_bytes / 1e6, 2),
            "fetch": {"seconds": round(t1 - t0, 2), "pages_per_s": round(pages / (t1 - t0), 1),
                      "cpu_ms_per_page": round(1000 * fetch_cpu, 2)},
            "extract": {"seconds": round(t2 - t1, 2), "pages_per_s": round(pages / (t2 - t1), 1),
                        "cpu_ms_per_page": round(1000 * extract_cpu, 2)},
            "tokens_per_doc_est": round(tokens_per_doc),
            "corpus_tokens": corpus_tokens,
            "corpus_docs_est": round(docs_needed),
            "corpus_cpu_hours_fetch_extract": round(docs_needed * (fetch_cpu + extract_cpu) / 3600),
            "note": "CPU of this process (crawler + extractor), servers excluded; real sites add network time "
                    "and per-host delays, which parallel hosts hide but do not remove.",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--pages-per-host", type=int, default=150)
    ap.add_argument("--corpus-tokens", type=float, default=56e9)
    ap.add_argument("--template", default=str(REPO_ROOT / "data" / "demo_site"))
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args(argv)
    res = run_bench(args.hosts, args.pages_per_host, args.corpus_tokens, Path(args.template))
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
