"""Benchmark: read -> clean+dedup -> split -> mix -> tokenize -> pack -> write, with Mistral's Tekken tokenizer.

    python -m benchmarks.bench_prepare                       # 1x and 10x, 1 worker, plus the datasets.map baseline
    python -m benchmarks.bench_prepare --docs 4000 --scales 1 10 --workers 4

The corpus is synthetic but realistic: documents are assembled from the demo website's extracted
sentences (or built-in food text when the demo has not been run), each a different random
selection, so they are distinct to MinHash, with a shared footer per source (boilerplate) and some
e-mail addresses and phone numbers (PII). Every scenario runs in its own process; peak RSS is the
largest sum of that process and its worker processes, sampled every 50 ms; "anon" is the same for
anonymous memory only (RSS less the file-backed pages of memory-mapped shards and caches). tokens/s per core =
training+eval tokens written / wall time / processes used; ``mix_warm`` and ``tokenize_warm`` are
the same two stages forced to run again with the token cache warm (what a re-run after a re-scrape
pays for the documents it already had), outside the wall time. The baseline is what a plain
script would do: ``datasets.Dataset.from_parquet`` + ``.map(tokenizer)`` over the same cleaned text
with the same tokenizer (MistralCommonBackend), writing its Arrow cache; no cleaning, packing or
sharding.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scrapers.schema import REPO_ROOT as REPO

TOKENIZER = "mistral-common:tekken_240911.json"
CATS = {"recipes": 0.43, "product_compositions": 0.25, "articles": 0.18, "code": 0.10,
        "product_descriptions": 0.03, "chemical_additives": 0.01}
FALLBACK = (
    "Rinse the red lentils until the water runs clear. Soften the onion and carrot in olive oil for eight minutes. "
    "Add cumin, smoked paprika and the stock, then simmer for twenty minutes. Season with lemon juice and salt. "
    "Ingredients: oat flour, water, rapeseed oil, sea salt, calcium carbonate. Energy per 100 g: 46 kcal. "
    "Citric acid (E330) is an acidity regulator found naturally in lemons and limes. Dietary fibre supports digestion. "
    "Most adults eat less than the recommended 30 g of fibre a day. Whole grains keep their bran and germ."
)


def _sentences() -> list[str]:
    import pyarrow.parquet as pq

    out: list[str] = []
    for p in sorted((REPO / "data" / "demo" / "extracted").glob("*.parquet")):
        if p.stem in CATS:
            for t in pq.read_table(p, columns=["text"]).column("text").to_pylist():
                out += [s.strip() + "." for s in (t or "").replace("\n", " ").split(". ") if len(s.split()) >= 4]
    return sorted(set(out)) or [s.strip() + "." for s in FALLBACK.split(". ")]


def make_corpus(root: Path, n_docs: int, seed: int = 0) -> None:
    """``extracted/<category>.parquet`` with ``n_docs`` documents split by the mixing ratios, written
    as the extract stage writes them: one row group per ``READ_BATCH`` documents, never the whole
    category at once (one huge row group would make readers hold a whole file)."""
    import pyarrow as pa

    from tasks.core.textio import CategoryWriters
    from tasks.extract import DOC_SCHEMA, READ_BATCH

    rng = random.Random(seed)
    pool = _sentences()
    out = root / "extracted"
    with CategoryWriters(out) as writers:
        for cat, share in CATS.items():
            rows = []
            for i in range(max(2, int(n_docs * share))):
                body = " ".join(rng.choice(pool) for _ in range(rng.randint(20, 60)))
                if cat == "code":
                    body = "import math\n\n" + "\n".join(f"def f{i}_{j}(x):\n    return x * {rng.randint(1, 99)}  # {rng.choice(pool)}"
                                                          for j in range(rng.randint(8, 30)))
                if rng.random() < 0.05:
                    body += f" Contact: cook{i}@example.org or +44 20 7946 {rng.randint(1000, 9999)}."
                doc_id = f"{cat}-{seed}-{i:08d}"
                rows.append({"doc_id": doc_id, "url": f"https://bench.test/{doc_id}", "source_id": f"bench-{cat}",
                             "category": cat, "title": doc_id, "text": f"{body}\n\nContent licensed CC BY 4.0, see /terms.html"})
                if len(rows) == READ_BATCH:
                    writers.write(cat, pa.Table.from_pylist(rows, schema=DOC_SCHEMA))
                    rows = []
            writers.write(cat, pa.Table.from_pylist(rows, schema=DOC_SCHEMA))
    (out / "manifest.json").write_text(json.dumps({"stage": "extract", "fingerprint": f"bench-{n_docs}-{seed}"}))


def _config(root: Path, workers: int):
    from tasks.core.config import config_from_dict

    return config_from_dict({
        "data_root": str(root), "seed": 1234, "scrape": {"sources": "configs/sources/demo.yaml"},
        "model": {"name": "mistralai/Mistral-Small-24B-Instruct-2501", "tokenizer": TOKENIZER},
        # memory is bounded by these buffers, not by the corpus: small values let a benchmark-sized
        # corpus reach them, so the flat part of the curve shows (production: 32768 rows, 16M tokens)
        "clean": {"workers": workers},
        "tokenize": {"workers": workers, "seq_len": 2048, "rows_per_shard": 1024, "shuffle_bucket_rows": 1024,
                     "cache_segment_tokens": 1 << 20},
    })


def child_pipeline(root: Path, workers: int) -> dict:
    """One scenario: every prepare stage on ``root``; returns per-stage seconds and token counts."""
    from tasks.clean.stage import run_clean
    from tasks.core.model import load_tokenizer
    from tasks.mix import run_mix
    from tasks.split import run_split
    from tasks.tokenize.stage import run_tokenize

    cfg = _config(root, workers)
    tok = load_tokenizer(cfg.model.name, cfg.model)
    times = {}
    t0 = time.perf_counter()
    m_clean = run_clean(cfg)
    times["clean"] = time.perf_counter() - t0
    t = time.perf_counter()
    run_split(cfg)
    times["split"] = time.perf_counter() - t
    t = time.perf_counter()
    run_mix(cfg, tokenizer=tok)
    times["mix"] = time.perf_counter() - t
    t = time.perf_counter()
    m_tok = run_tokenize(cfg, tokenizer=tok)
    times["tokenize"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    # mix and tokenize once more on the same split, forced: the token cache is warm, as for a re-run
    # after a re-scrape (outside "total": what a first run costs is the figure above)
    for d in (root / "mix", *(root / "tokenized").iterdir()):
        (d / "manifest.json").unlink()
    t = time.perf_counter()
    run_mix(cfg, tokenizer=tok)
    times["mix_warm"] = time.perf_counter() - t
    t = time.perf_counter()
    run_tokenize(cfg, tokenizer=tok)
    times["tokenize_warm"] = time.perf_counter() - t
    k = m_tok["counts"]
    tokens = k["train"]["tokens"] + sum(v["tokens"] for v in k["eval"].values())
    chars = sum(v.get("chars_out", 0) for v in m_clean["counts"]["by_category"].values())
    return {"seconds": times, "tokens": tokens, "docs_in": m_clean["counts"]["documents_in"], "chars": chars}


def child_baseline(root: Path, workers: int) -> dict:
    """datasets.map + tokenizer over the cleaned text (same tokenizer, same machine)."""
    import datasets

    from tasks.core.model import load_tokenizer

    cfg = _config(root, workers)
    tok = load_tokenizer(cfg.model.name, cfg.model)
    datasets.disable_progress_bars()
    files = [str(p) for p in sorted((root / "clean").glob("*.parquet")) if p.stem in CATS]
    t0 = time.perf_counter()
    ds = datasets.Dataset.from_parquet(files, cache_dir=str(root / "hf_cache"), columns=["text"])
    ds = ds.map(lambda b: {"input_ids": tok(b["text"], add_special_tokens=False)["input_ids"]}, batched=True,
                batch_size=512, remove_columns=["text"], num_proc=workers if workers > 1 else None,
                cache_file_name=str(root / "hf_cache" / "tokenized.arrow"))
    tokens = sum(len(x) for b in ds.iter(batch_size=4096) for x in b["input_ids"])
    return {"seconds": {"total": time.perf_counter() - t0}, "tokens": tokens}


def _anon_rss(pid: int) -> int:
    """Resident anonymous memory (heap, Arrow buffers): RSS without the file-backed pages of
    memory-mapped shards and caches, which the kernel can drop at any time. 0 where /proc has no RssAnon."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run_child(kind: str, root: Path, workers: int) -> dict:
    """Run a scenario in a fresh process; sample the RSS of it and its workers."""
    peak_anon = 0
    import psutil

    cmd = [sys.executable, "-m", "benchmarks.bench_prepare", "--child", kind, "--root", str(root), "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(c.memory_info().rss for c in procs))
            peak_anon = max(peak_anon, sum(_anon_rss(c.pid) for c in procs))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{kind} scenario failed ({proc.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"], res["peak_anon_mb"] = peak / 2**20, peak_anon / 2**20
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=500, help="documents at scale 1 (default 500)")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--workers", type=int, default=1, help="worker processes (tokens/s is divided by this)")
    ap.add_argument("--child", choices=["pipeline", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        fn = child_pipeline if a.child == "pipeline" else child_baseline
        print(json.dumps(fn(a.root, a.workers)))
        return
    procs = max(1, a.workers)
    print(f"bench_prepare: Tekken ({TOKENIZER}), seq_len 2048, {a.workers} worker(s), {os.cpu_count()} CPUs visible")
    head = f"{'scenario':<22}{'docs':>9}{'tokens':>12}{'wall s':>9}{'tok/s/core':>12}{'peak RSS MB':>13}{'anon MB':>9}  per stage (s)"
    print(head + "\n" + "-" * (len(head) + 30))
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        for scale in a.scales:
            root = Path(tmp) / f"x{scale}"
            make_corpus(root, a.docs * scale)
            p = _run_child("pipeline", root, a.workers)
            b = _run_child("baseline", root, a.workers)
            for name, r in ((f"pipeline x{scale}", p), (f"datasets.map x{scale}", b)):
                s = r["seconds"]
                stages = " ".join(f"{k} {v:.1f}" for k, v in s.items() if k != "total")
                print(f"{name:<22}{p['docs_in']:>9,}{r['tokens']:>12,}{s['total']:>9.1f}"
                      f"{r['tokens'] / s['total'] / procs:>12,.0f}{r['peak_rss_mb']:>13,.0f}{r['peak_anon_mb']:>9,.0f}  {stages}")
            print(f"{'':<22}(pipeline: {p['chars'] / p['tokens']:.2f} chars/token; tokenize-only share of wall: "
                  f"{p['seconds']['tokenize'] / p['seconds']['total']:.0%})")


if __name__ == "__main__":
    main()
